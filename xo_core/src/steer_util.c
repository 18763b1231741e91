// SPDX-License-Identifier: MIT
/* Plumbing for the steering code: network namespaces, bpffs, libbpf logs. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <bpf/libbpf.h>
#include <linux/magic.h>

#include "steer_internal.h"

int xo_netns_enter(const char *path, int *saved)
{
	int fd, cur;

	*saved = -1;
	if (!path || !*path)
		return 0;
	/* Only this thread moves: a netlink socket (libbpf's tc calls, the
	 * flower backend) belongs to the namespace it was created in. */
	cur = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
	if (cur < 0)
		return xo_fail_sys("open /proc/thread-self/ns/net");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int ret = xo_fail_sys("open network namespace %s", path);

		close(cur);
		return ret;
	}
	if (setns(fd, CLONE_NEWNET) < 0) {
		int ret = xo_fail_sys("setns into %s", path);

		close(fd);
		close(cur);
		return ret;
	}
	close(fd);
	*saved = cur;
	return 0;
}

void xo_netns_leave(int saved)
{
	int err = errno;

	if (saved < 0)
		return;
	/* Cannot fail for a namespace we were just in; if it did, the
	 * thread would be stranded, which is worth a loud message. */
	if (setns(saved, CLONE_NEWNET) < 0)
		fprintf(stderr, "xo: cannot return to the original network "
			"namespace: %s\n", strerror(errno));
	close(saved);
	errno = err;
}

static int is_fs(const char *path, long magic, int *exists)
{
	struct statfs st;

	if (statfs(path, &st) < 0) {
		*exists = 0;
		return 0;
	}
	*exists = 1;
	return (long)st.f_type == magic;
}

static int mkdir_p(const char *dir)
{
	char buf[PATH_MAX];
	size_t len = strlen(dir);

	if (len >= sizeof(buf)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(buf, dir, len + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0700) < 0 && errno != EEXIST)
			return -1;
		*p = '/';
	}
	if (mkdir(buf, 0700) < 0 && errno != EEXIST)
		return -1;
	return 0;
}

int xo_bpffs_prepare(const char *dir, int *mounted, int *created)
{
	char parent[PATH_MAX];
	int exists, bpf;
	char *slash;

	*mounted = 0;
	*created = 0;
	if (strlen(dir) >= sizeof(parent) || dir[0] != '/')
		return xo_fail(XO_E_INVAL, "pin directory '%s' must be an "
			       "absolute path", dir);
	bpf = is_fs(dir, BPF_FS_MAGIC, &exists);
	if (bpf)
		return 0;
	if (!exists) {
		/* /sys/fs/bpf is a directory of sysfs where nothing can be
		 * created until a bpffs is mounted on it (what systemd
		 * normally does at boot). Mount it there, not deeper, so
		 * other bpffs users find it where they expect it. */
		strcpy(parent, dir);
		slash = strrchr(parent, '/');
		if (slash && slash != parent) {
			int pexists;

			*slash = '\0';
			if (is_fs(parent, SYSFS_MAGIC, &pexists) &&
			    mount("bpf", parent, "bpf", 0, "mode=0700") < 0)
				return xo_fail_sys("mount bpffs on %s", parent);
		}
		if (mkdir_p(dir) < 0)
			return xo_fail_sys("create pin directory %s", dir);
		*created = 1;
		if (is_fs(dir, BPF_FS_MAGIC, &exists))
			return 0;
	}
	if (mount("bpf", dir, "bpf", 0, "mode=0700") < 0)
		return xo_fail_sys("mount bpffs on %s", dir);
	*mounted = 1;
	return 0;
}

/* libbpf's log: the first warning since the last reset, per thread. */
static __thread char libbpf_first[384];
static __thread char libbpf_detail[512];
static pthread_once_t libbpf_once = PTHREAD_ONCE_INIT;
static int libbpf_debug;

static void chomp(char *s)
{
	size_t n = strlen(s);

	while (n && (s[n - 1] == '\n' || s[n - 1] == ' '))
		s[--n] = '\0';
}

/* A verifier log is one long message; keep its last line, which is where
 * the verifier says what it rejected. */
static void keep_verifier_reason(const char *msg)
{
	const char *end = strstr(msg, "-- END PROG LOAD LOG --");
	const char *start;

	if (!end)
		return;
	while (end > msg && (end[-1] == '\n' || end[-1] == ' '))
		end--;
	start = end;
	while (start > msg && start[-1] != '\n')
		start--;
	if (end > start)
		snprintf(libbpf_first + strlen(libbpf_first),
			 sizeof(libbpf_first) - strlen(libbpf_first),
			 " [verifier: %.*s]", (int)(end - start), start);
}

static int libbpf_log(enum libbpf_print_level level, const char *fmt,
		      va_list ap)
{
	char *msg = NULL;
	va_list aq;

	va_copy(aq, ap);
	if (libbpf_debug)
		vfprintf(stderr, fmt, aq);
	va_end(aq);
	if (level != LIBBPF_WARN)
		return 0;
	/* Verifier logs run to megabytes: no fixed buffer. */
	if (vasprintf(&msg, fmt, ap) < 0)
		return 0;
	if (strstr(msg, "-- BEGIN PROG LOAD LOG --")) {
		keep_verifier_reason(msg);
	} else if (!libbpf_first[0]) {
		const char *m = strncmp(msg, "libbpf: ", 8) ? msg : msg + 8;
		size_t n = strnlen(m, sizeof(libbpf_first) - 1);

		memcpy(libbpf_first, m, n);
		libbpf_first[n] = '\0';
		chomp(libbpf_first);
	}
	free(msg);
	return 0;
}

static void libbpf_setup(void)
{
	/* Quiet by default: the library's warnings end up in our error
	 * sentences. XO_LIBBPF_DEBUG=1 shows everything (verifier logs). */
	libbpf_debug = getenv("XO_LIBBPF_DEBUG") != NULL;
	libbpf_set_print(libbpf_log);
}

void xo_libbpf_init(void)
{
	pthread_once(&libbpf_once, libbpf_setup);
}

void xo_libbpf_reset(void)
{
	libbpf_first[0] = '\0';
}

const char *xo_libbpf_detail(void)
{
	if (!libbpf_first[0])
		return "";
	snprintf(libbpf_detail, sizeof(libbpf_detail), "; libbpf: %s",
		 libbpf_first);
	return libbpf_detail;
}

int xo_fail_bpf(int ret, const char *step, ...)
{
	char what[384];
	va_list ap;
	int err = ret < 0 ? -ret : (errno ? errno : EINVAL);
	int code;

	va_start(ap, step);
	vsnprintf(what, sizeof(what), step, ap);
	va_end(ap);
	errno = err;
	code = xo_fail_sys("%s%s", what, xo_libbpf_detail());
	if (err == EPERM) {
		xo_append_hint("loading and attaching BPF programs needs root (CAP_BPF and CAP_NET_ADMIN)");
	} else if (err == EACCES) {
		/* For BPF, EACCES is the verifier or an LSM, not a privilege. */
		xo_append_hint("the BPF verifier or an LSM refused it");
		code = XO_E_SYS;
	}
	return code;
}

void xo_bench_flow_key(struct xo_flow_key *k)
{
	/* A flow in the benchmarking range (198.18.0.0/15) that no lab uses:
	 * 198.19.255.254:port -> 198.19.255.253:9. */
	memset(k, 0, sizeof(*k));
	k->family = XO_AF_INET;
	k->proto = XO_IPPROTO_TCP;
	memcpy(k->src_addr, (uint8_t[]){ 198, 19, 255, 254 }, 4);
	memcpy(k->dst_addr, (uint8_t[]){ 198, 19, 255, 253 }, 4);
	k->dst_port = __builtin_bswap16(9);
}
