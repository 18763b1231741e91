// SPDX-License-Identifier: MIT
/* Per-thread error reporting: a code, an errno and a sentence with context. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

static __thread char last_error[512];
static __thread int last_errno;
__thread unsigned int xo_syscall_count;

const char *xo_last_error(void)
{
	return last_error;
}

int xo_last_errno(void)
{
	return last_errno;
}

void xo_clear_error(void)
{
	last_error[0] = '\0';
	last_errno = 0;
}

int xo_fail(int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
	last_errno = 0;
	return code;
}

int xo_fail_sys(const char *step, ...)
{
	int err = errno;
	char what[256];
	va_list ap;

	va_start(ap, step);
	vsnprintf(what, sizeof(what), step, ap);
	va_end(ap);
	snprintf(last_error, sizeof(last_error), "%s: %s (errno %d)", what,
		 strerror(err), err);
	last_errno = err;
	return (err == EPERM || err == EACCES) ? XO_E_PERM : XO_E_SYS;
}

void xo_append_hint(const char *hint)
{
	size_t len = strlen(last_error);

	snprintf(last_error + len, sizeof(last_error) - len, "; %s", hint);
}

const char *xo_strerror(int code)
{
	static const char *const names[] = {
		"XO_OK", "XO_E_SYS", "XO_E_PERM", "XO_E_NOT_ESTABLISHED",
		"XO_E_NOMEM", "XO_E_INVAL", "XO_E_TRUNCATED", "XO_E_BAD_MAGIC",
		"XO_E_VERSION", "XO_E_LENGTH", "XO_E_FIELD", "XO_E_DUPLICATE",
		"XO_E_MISSING", "XO_E_TOO_LARGE", "XO_E_AUTH", "XO_E_REPLAY",
		"XO_E_MSG_TYPE", "XO_E_CHANNEL", "XO_E_NOSPACE",
		"XO_E_UNSUPPORTED", "XO_E_BUSY", "XO_E_NOTFOUND",
		"XO_E_SEQUENCE", "XO_E_REFUSED", "XO_E_STATE",
		"XO_E_URGENT",
	};
	int idx = -code;

	if (idx < 0 || idx >= (int)(sizeof(names) / sizeof(names[0])))
		return "XO_E_UNKNOWN";
	return names[idx];
}
