/*
 * Copyright (c) 2026 The Parley developers.
 *
 * Permission to use, copy, modify, and distribute this software for any
 * purpose with or without fee is hereby granted, provided that the above
 * copyright notice and this permission notice appear in all copies.
 *
 * THE SOFTWARE IS PROVIDED "AS IS" AND THE AUTHOR DISCLAIMS ALL WARRANTIES
 * WITH REGARD TO THIS SOFTWARE INCLUDING ALL IMPLIED WARRANTIES OF
 * MERCHANTABILITY AND FITNESS. IN NO EVENT SHALL THE AUTHOR BE LIABLE FOR
 * ANY SPECIAL, DIRECT, INDIRECT, OR CONSEQUENTIAL DAMAGES OR ANY DAMAGES
 * WHATSOEVER RESULTING FROM LOSS OF USE, DATA OR PROFITS, WHETHER IN AN
 * ACTION OF CONTRACT, NEGLIGENCE OR OTHER TORTIOUS ACTION, ARISING OUT OF
 * OR IN CONNECTION WITH THE USE OR PERFORMANCE OF THIS SOFTWARE.
 */

/*
 * Runtime settings come from the PARLEY_* environment and are checked once,
 * in the parent, before any worker exists. A bad or missing setting stops
 * start-up with one line naming it: nothing falls back to an unsafe default.
 */

#include <sys/types.h>
#include <sys/stat.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jwt.h>

#include "parley.h"

#define KEY_FILE_MAX		(64 * 1024)

struct int_setting {
	const char	*name;
	int64_t		min;
	int64_t		max;
	int64_t		def;
	int64_t		scale;
};

static void	config_fail(const char *, ...)
		    __attribute__((noreturn, format(printf, 1, 2)));
static const char *config_env(const char *);
static int64_t	config_int(const struct int_setting *);
static void	config_listen(void);
static void	config_database(void);
static void	config_connect_timeout(size_t);
static void	config_jwt(void);
static void	config_origins(void);
static void	config_read_key(const char *, const char *);

/* Connection defaults Parley needs unless the URL says otherwise. */
static const char *db_defaults[][2] = {
	{ "gssencmode", "disable" },	/* GSSAPI probe breaks seccomp. */
	{ "connect_timeout", "3" },
	{ "keepalives", "1" },
	{ "keepalives_idle", "30" },
	{ "keepalives_interval", "10" },
	{ "keepalives_count", "3" },
	{ "application_name", "parley" },
	{ NULL, NULL },
};

struct parley_config	parley_cfg;

void
config_load(void)
{
	static const struct int_setting	workers = {
		"PARLEY_WORKERS", 1, KORE_WORKER_MAX, 0, 1 };
	static const struct int_setting	chars = {
		"PARLEY_MAX_MESSAGE_CHARS", 1, 1000000, 4000, 1 };
	static const struct int_setting	sockets = {
		"PARLEY_MAX_SOCKETS_PER_USER", 1, 100000, 32, 1 };
	static const struct int_setting	rate = {
		"PARLEY_RATE_MESSAGES", 1, 100000, 10, 1 };
	static const struct int_setting	pool = {
		"PARLEY_DB_POOL", 1, 64, 4, 1 };
	static const struct int_setting	db_timeout = {
		"PARLEY_DB_TIMEOUT", 3, 3600, 15, 1000 };
	static const struct int_setting	page_cache = {
		"PARLEY_PAGE_CACHE_MB", 0, 65536, 32, 1024 * 1024 };
	static const struct int_setting	frame = {
		"PARLEY_MAX_FRAME_BYTES", 1024, 1000000, 65536, 1 };
	static const struct int_setting	output = {
		"PARLEY_MAX_OUTPUT_BYTES", 4096, 1 << 30, 1 << 20, 1 };
	static const struct int_setting	idle = {
		"PARLEY_IDLE_TIMEOUT", 5, 3600, 75, 1000 };
	static const struct int_setting	ping = {
		"PARLEY_PING_INTERVAL", 1, 3600, 25, 1000 };
	static const struct int_setting	drain = {
		"PARLEY_DRAIN_TIMEOUT", 1, 600, 10, 1000 };
	static const struct int_setting	bus_queue = {
		"PARLEY_BUS_QUEUE_MAX", 100, 10000000, 100000, 1 };
	static const struct int_setting	lanes = {
		"PARLEY_SEND_LANES", 1, PARLEY_SEND_LANES_MAX, 2, 1 };
	static const struct int_setting	split = {
		"PARLEY_SEND_SPLIT_MS", 0, 60000, 50, 1 };

	memset(&parley_cfg, 0, sizeof(parley_cfg));

	parley_cfg.db_timeout_ms = config_int(&db_timeout);

	config_listen();
	config_database();
	config_jwt();
	config_origins();

	parley_cfg.workers = config_int(&workers);
	parley_cfg.max_message_chars = config_int(&chars);
	parley_cfg.max_sockets_per_user = config_int(&sockets);
	parley_cfg.rate_messages = config_int(&rate);
	parley_cfg.db_pool_size = config_int(&pool);
	parley_cfg.max_frame_bytes = config_int(&frame);
	parley_cfg.max_output_bytes = config_int(&output);
	parley_cfg.idle_timeout_ms = config_int(&idle);
	parley_cfg.ping_interval_ms = config_int(&ping);
	parley_cfg.drain_timeout_ms = config_int(&drain);
	parley_cfg.bus_queue_max = config_int(&bus_queue);
	parley_cfg.page_cache_bytes = config_int(&page_cache);
	parley_cfg.send_lanes = config_int(&lanes);
	parley_cfg.send_split_ms = config_int(&split);

	if (parley_cfg.ping_interval_ms >= parley_cfg.idle_timeout_ms)
		config_fail("PARLEY_PING_INTERVAL must be below "
		    "PARLEY_IDLE_TIMEOUT");
}

static void
config_fail(const char *fmt, ...)
{
	va_list		args;

	fprintf(stderr, "parley: configuration error: ");
	va_start(args, fmt);
	vfprintf(stderr, fmt, args);
	va_end(args);
	fprintf(stderr, "\n");

	exit(1);
}

/* An unset or empty variable reads as NULL. */
static const char *
config_env(const char *name)
{
	const char	*value;

	if ((value = getenv(name)) == NULL || *value == '\0')
		return (NULL);

	return (value);
}

static int64_t
config_int(const struct int_setting *s)
{
	const char	*value;
	int64_t		n;

	if ((value = config_env(s->name)) == NULL)
		return (s->def * s->scale);

	if (!util_parse_int64(value, s->min, s->max, &n)) {
		config_fail("%s must be an integer from %lld to %lld, "
		    "not '%s'", s->name, (long long)s->min,
		    (long long)s->max, value);
	}

	return (n * s->scale);
}

static void
config_listen(void)
{
	const char	*value;
	char		*copy, *colon, *host;
	int64_t		port;

	if ((value = config_env("PARLEY_LISTEN")) == NULL)
		value = "127.0.0.1:8888";

	copy = kore_strdup(value);
	if ((colon = strrchr(copy, ':')) == NULL || colon == copy)
		config_fail("PARLEY_LISTEN must be host:port, not '%s'", value);
	*colon++ = '\0';

	if (!util_parse_int64(colon, 1, 65535, &port))
		config_fail("PARLEY_LISTEN has a bad port in '%s'", value);

	/* IPv6 addresses come in brackets: [::1]:8888. */
	host = copy;
	if (host[0] == '[') {
		if (host[strlen(host) - 1] != ']')
			config_fail("PARLEY_LISTEN has a bad address '%s'",
			    value);
		host[strlen(host) - 1] = '\0';
		host++;
	}

	parley_cfg.listen_host = kore_strdup(host);
	parley_cfg.listen_port = kore_strdup(colon);
	kore_free(copy);
}

/*
 * The pool's connections run with a statement timeout below
 * PARLEY_DB_TIMEOUT, so that PostgreSQL rolls a slow call back before
 * Parley gives up on it: a call Parley reports as failed has not
 * committed. Schema migrations connect without it.
 */
static void
config_database(void)
{
	PQconninfoOption	*opts, *o;
	const char		*url, *options;
	char			*err, *value;
	size_t			n, i, d, len;

	if ((url = config_env("PARLEY_DATABASE_URL")) == NULL) {
		config_fail("PARLEY_DATABASE_URL is not set "
		    "(a libpq URL, e.g. postgresql://parley@127.0.0.1/parley)");
	}

	err = NULL;
	if ((opts = PQconninfoParse(url, &err)) == NULL) {
		/* libpq's message ends in a newline and never holds the URL. */
		if (err != NULL)
			err[strcspn(err, "\n")] = '\0';
		config_fail("PARLEY_DATABASE_URL is not a valid libpq "
		    "connection string: %s", err ? err : "out of memory");
	}

	n = 1;
	for (o = opts; o->keyword != NULL; o++)
		n++;
	n += sizeof(db_defaults) / sizeof(db_defaults[0]);

	parley_cfg.db_keywords = kore_calloc(n, sizeof(char *));
	parley_cfg.db_values = kore_calloc(n, sizeof(char *));
	parley_cfg.db_pool_values = kore_calloc(n, sizeof(char *));

	i = 0;
	options = "";
	for (o = opts; o->keyword != NULL; o++) {
		if (o->val == NULL || o->val[0] == '\0')
			continue;
		if (!strcmp(o->keyword, "options")) {
			options = o->val;
			continue;
		}
		parley_cfg.db_keywords[i] = kore_strdup(o->keyword);
		parley_cfg.db_values[i] = kore_strdup(o->val);
		i++;
	}

	for (d = 0; db_defaults[d][0] != NULL; d++) {
		for (o = opts; o->keyword != NULL; o++) {
			if (!strcmp(o->keyword, db_defaults[d][0]))
				break;
		}
		if (o->keyword != NULL && o->val != NULL && o->val[0] != '\0')
			continue;
		parley_cfg.db_keywords[i] = db_defaults[d][0];
		parley_cfg.db_values[i] = db_defaults[d][1];
		i++;
	}

	config_connect_timeout(i);

	/* Libpq skips an empty value: the URL's options, if any, and ours. */
	memcpy(parley_cfg.db_pool_values, parley_cfg.db_values,
	    i * sizeof(char *));
	parley_cfg.db_keywords[i] = "options";
	parley_cfg.db_values[i] = kore_strdup(options);
	len = strlen(options) + 64;
	value = kore_malloc(len);
	(void)snprintf(value, len, "%s -c statement_timeout=%llu", options,
	    (unsigned long long)parley_cfg.db_timeout_ms * 2 / 3);
	parley_cfg.db_pool_values[i] = value;

	PQconninfoFree(opts);
}

/*
 * The pool connects asynchronously, where libpq does not apply
 * connect_timeout: db.c does, as libpq would (seconds, at least 2; none
 * given, or zero, is PARLEY_DB_TIMEOUT rather than forever).
 */
static void
config_connect_timeout(size_t n)
{
	size_t		i;
	int64_t		seconds;

	parley_cfg.db_connect_timeout_ms = parley_cfg.db_timeout_ms;
	for (i = 0; i < n; i++) {
		if (strcmp(parley_cfg.db_keywords[i], "connect_timeout"))
			continue;
		if (!util_parse_int64(parley_cfg.db_values[i], INT64_MIN,
		    INT64_MAX, &seconds) || seconds <= 0)
			return;
		if (seconds > 3600)
			seconds = 3600;
		parley_cfg.db_connect_timeout_ms =
		    (seconds < 2 ? 2 : seconds) * 1000;
		return;
	}
}

static void
config_jwt(void)
{
	const char	*alg, *secret, *path;

	if ((alg = config_env("PARLEY_JWT_ALG")) == NULL)
		alg = "HS256";

	if (!strcmp(alg, "HS256")) {
		parley_cfg.jwt_alg = JWT_ALG_HS256;
		if ((secret = config_env("PARLEY_JWT_SECRET")) == NULL)
			config_fail("PARLEY_JWT_SECRET is not set "
			    "(required for PARLEY_JWT_ALG=HS256)");
		parley_cfg.jwt_key = (unsigned char *)kore_strdup(secret);
		parley_cfg.jwt_key_len = strlen(secret);
	} else if (!strcmp(alg, "RS256") || !strcmp(alg, "ES256")) {
		parley_cfg.jwt_alg = alg[0] == 'R' ?
		    JWT_ALG_RS256 : JWT_ALG_ES256;
		if ((path = config_env("PARLEY_JWT_PUBLIC_KEY")) == NULL)
			config_fail("PARLEY_JWT_PUBLIC_KEY is not set "
			    "(a PEM file, required for PARLEY_JWT_ALG=%s)",
			    alg);
		config_read_key("PARLEY_JWT_PUBLIC_KEY", path);
	} else {
		config_fail("PARLEY_JWT_ALG must be HS256, RS256 or ES256, "
		    "not '%s'", alg);
	}

	if ((secret = config_env("PARLEY_JWT_ISSUER")) != NULL)
		parley_cfg.jwt_issuer = kore_strdup(secret);
	if ((secret = config_env("PARLEY_JWT_AUDIENCE")) != NULL)
		parley_cfg.jwt_audience = kore_strdup(secret);
}

static void
config_read_key(const char *name, const char *path)
{
	struct stat	st;
	ssize_t		r;
	int		fd;

	if ((fd = open(path, O_RDONLY)) == -1)
		config_fail("%s: cannot read %s: %s", name, path, errno_s);

	if (fstat(fd, &st) == -1 || !S_ISREG(st.st_mode) ||
	    st.st_size <= 0 || st.st_size > KEY_FILE_MAX)
		config_fail("%s: %s is not a PEM file of at most %d bytes",
		    name, path, KEY_FILE_MAX);

	parley_cfg.jwt_key = kore_calloc(1, st.st_size + 1);
	if ((r = read(fd, parley_cfg.jwt_key, st.st_size)) != st.st_size)
		config_fail("%s: cannot read %s: %s", name, path,
		    r == -1 ? errno_s : "short read");
	(void)close(fd);

	if (strstr((char *)parley_cfg.jwt_key, "-----BEGIN ") == NULL)
		config_fail("%s: %s holds no PEM key", name, path);

	parley_cfg.jwt_key_len = st.st_size;
}

static void
config_origins(void)
{
	const char	*value;
	char		*copy, *item, *end, *save;

	if ((value = config_env("PARLEY_ALLOWED_ORIGINS")) == NULL)
		return;

	copy = kore_strdup(value);
	for (item = strtok_r(copy, ",", &save); item != NULL;
	    item = strtok_r(NULL, ",", &save)) {
		while (isspace((unsigned char)*item))
			item++;
		end = item + strlen(item);
		while (end > item && isspace((unsigned char)end[-1]))
			*--end = '\0';
		if (*item == '\0')
			continue;
		if (strncmp(item, "http://", 7) && strncmp(item, "https://", 8))
			config_fail("PARLEY_ALLOWED_ORIGINS: '%s' is not an "
			    "origin like https://app.example.com", item);

		parley_cfg.origins = kore_realloc(parley_cfg.origins,
		    (parley_cfg.origins_count + 1) * sizeof(char *));
		parley_cfg.origins[parley_cfg.origins_count++] =
		    kore_strdup(item);
	}
	kore_free(copy);

	if (parley_cfg.origins_count == 0)
		config_fail("PARLEY_ALLOWED_ORIGINS is set but lists no origin");
}
