// SPDX-License-Identifier: MIT
/* struct xo_endpoint to and from the socket API's addresses. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include "internal.h"

int xo_endpoint_from_sockaddr(const void *sa, uint32_t len,
			      struct xo_endpoint *ep)
{
	const struct sockaddr *s = sa;

	if (!sa || !ep || len < sizeof(sa_family_t))
		return xo_fail(XO_E_INVAL, "endpoint: no address");
	memset(ep, 0, sizeof(*ep));
	if (s->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *sin = sa;

		ep->family = AF_INET;
		ep->port = ntohs(sin->sin_port);
		memcpy(ep->addr, &sin->sin_addr, 4);
		return 0;
	}
	if (s->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *sin6 = sa;

		ep->family = AF_INET6;
		ep->port = ntohs(sin6->sin6_port);
		ep->scope_id = sin6->sin6_scope_id;
		memcpy(ep->addr, &sin6->sin6_addr, 16);
		return 0;
	}
	return xo_fail(XO_E_NOT_ESTABLISHED,
		       "endpoint: address family %d is not IPv4/IPv6",
		       s->sa_family);
}

int xo_endpoint_of_fd(int fd, int peer, struct xo_endpoint *ep)
{
	struct sockaddr_storage ss;
	socklen_t len = sizeof(ss);
	int ret;

	if (peer)
		ret = XO_SYSCALL(getpeername(fd, (struct sockaddr *)&ss, &len));
	else
		ret = XO_SYSCALL(getsockname(fd, (struct sockaddr *)&ss, &len));
	if (ret < 0)
		return xo_fail_sys("%s(fd %d)", peer ? "getpeername" :
							"getsockname", fd);
	return xo_endpoint_from_sockaddr(&ss, len, ep);
}

int xo_endpoint_to_sockaddr(const struct xo_endpoint *ep, void *sa,
			    uint32_t cap)
{
	if (!ep || !sa)
		return xo_fail(XO_E_INVAL, "endpoint: NULL argument");
	if (ep->family == AF_INET && cap >= sizeof(struct sockaddr_in)) {
		struct sockaddr_in *sin = sa;

		memset(sin, 0, sizeof(*sin));
		sin->sin_family = AF_INET;
		sin->sin_port = htons(ep->port);
		memcpy(&sin->sin_addr, ep->addr, 4);
		return sizeof(*sin);
	}
	if (ep->family == AF_INET6 && cap >= sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 *sin6 = sa;

		memset(sin6, 0, sizeof(*sin6));
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons(ep->port);
		sin6->sin6_scope_id = ep->scope_id;
		memcpy(&sin6->sin6_addr, ep->addr, 16);
		return sizeof(*sin6);
	}
	return xo_fail(XO_E_INVAL, "endpoint: family %u in %u bytes",
		       ep->family, cap);
}
