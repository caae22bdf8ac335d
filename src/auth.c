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
 * Access tokens: where they are read from and what makes them valid
 * (PROTOCOL.md section 1). libjwt 1.10 checks the signature only: it takes
 * any HMAC variant for the same secret and ignores exp/nbf, so the
 * algorithm is pinned and every claim is checked here.
 *
 * A client sends the same token with every request until it expires, and
 * checking it (HMAC, libjwt's jansson parse, ours with yajl) was a tenth
 * of the server's CPU for a page of history. Each worker keeps the tokens
 * it accepted in a small direct-mapped table, found by the whole token:
 * what a token says cannot change, only its exp can pass, and that is
 * checked at every use.
 */

#include <sys/types.h>

#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jwt.h>

#include "parley.h"

#define TOKEN_MAX		8192
#define CLOCK_LEEWAY		30

/* At most 2 MiB of tokens per worker. */
#define AUTH_CACHE_SLOTS	1024
#define AUTH_CACHE_TOKEN_MAX	2048

struct auth_cached {
	char			*token;
	size_t			len;
	struct identity		id;
};

static struct auth_cached	auth_cache[AUTH_CACHE_SLOTS];

static int	auth_token_shape(const char *);
static int	auth_decode(const char *, struct identity *);
static struct auth_cached *auth_cache_slot(const char *, size_t);
static int	auth_cache_holds(const struct auth_cached *, const char *,
		    size_t);
static void	auth_cache_put(struct auth_cached *, const char *, size_t,
		    const struct identity *);
static int	auth_claims(yajl_val, struct identity *);
static int	auth_claim_time(yajl_val, const char *, int, int64_t *);
static int	auth_claim_user(yajl_val, const char *, struct identity *);
static int	auth_claim_has_word(yajl_val, const char *, const char *);
static const char *auth_claim_string(yajl_val, const char *);
static void	auth_copy_name(char *, size_t, const char *);
static const char *auth_subprotocol_token(const char *, char *, size_t);

int
auth_verify(const char *token, struct identity *id)
{
	struct auth_cached	*c;
	size_t			len;
	int			rc;

	memset(id, 0, sizeof(*id));

	if (!auth_token_shape(token))
		return (AUTH_INVALID);

	len = strlen(token);
	c = auth_cache_slot(token, len);
	if (c->token != NULL && auth_cache_holds(c, token, len)) {
		if (!auth_token_valid_at(&c->id, util_now()))
			return (AUTH_EXPIRED);
		*id = c->id;
		return (AUTH_OK);
	}

	if ((rc = auth_decode(token, id)) == AUTH_OK)
		auth_cache_put(c, token, len, id);

	return (rc);
}

/* The signature and every claim: a token not seen before. */
static int
auth_decode(const char *token, struct identity *id)
{
	jwt_t		*jwt;
	char		*grants;
	yajl_val	root;
	int		rc;

	jwt = NULL;
	if (jwt_decode(&jwt, token, parley_cfg.jwt_key,
	    (int)parley_cfg.jwt_key_len) != 0 || jwt == NULL)
		return (AUTH_INVALID);

	if ((int)jwt_get_alg(jwt) != parley_cfg.jwt_alg) {
		jwt_free(jwt);
		return (AUTH_INVALID);
	}

	grants = jwt_get_grants_json(jwt, NULL);
	jwt_free(jwt);
	if (grants == NULL)
		return (AUTH_INVALID);

	root = yajl_tree_parse(grants, NULL, 0);
	free(grants);
	if (root == NULL || !YAJL_IS_OBJECT(root)) {
		yajl_tree_free(root);
		return (AUTH_INVALID);
	}

	rc = auth_claims(root, id);
	yajl_tree_free(root);

	return (rc);
}

/* Whether an open socket's token is still good at `now` (with leeway). */
int
auth_token_valid_at(const struct identity *id, int64_t now)
{
	return (now <= id->exp + CLOCK_LEEWAY);
}

/*
 * Find the caller's token in the first source present, in the order of
 * PROTOCOL.md section 1, and verify it. An invalid token in that source
 * fails; it never falls through to the next source.
 */
int
auth_request(struct http_request *req, int flags, struct identity *id)
{
	const char	*hdr, *tok;
	char		*cookie, buf[TOKEN_MAX + 1];

	memset(id, 0, sizeof(*id));

	tok = NULL;
	if (http_request_header(req, "authorization", &hdr) &&
	    !strncasecmp(hdr, "bearer ", 7)) {
		tok = hdr + 7;
		while (*tok == ' ')
			tok++;
	}

	if (tok == NULL && (flags & TOKEN_SOURCE_SOCKET) &&
	    http_request_header(req, "sec-websocket-protocol", &hdr))
		tok = auth_subprotocol_token(hdr, buf, sizeof(buf));

	if (tok == NULL && util_query_get(req, "token", buf, sizeof(buf)))
		tok = buf;

	if (tok == NULL) {
		http_populate_cookies(req);
		if (http_request_cookie(req, "access_token", &cookie))
			tok = cookie;
	}

	if (tok == NULL)
		return (AUTH_MISSING);

	return (auth_verify(tok, id));
}

/* FNV-1a of the whole token. */
static struct auth_cached *
auth_cache_slot(const char *token, size_t len)
{
	u_int64_t	h;
	size_t		i;

	h = 14695981039346656037ULL;
	for (i = 0; i < len; i++) {
		h ^= (unsigned char)token[i];
		h *= 1099511628211ULL;
	}

	return (&auth_cache[h % AUTH_CACHE_SLOTS]);
}

/*
 * In constant time, as for any comparison with a signature: how far a
 * guess matched must not show in how long it took to refuse.
 */
static int
auth_cache_holds(const struct auth_cached *c, const char *token, size_t len)
{
	u_int8_t	diff;
	size_t		i;

	if (c->len != len)
		return (0);

	diff = 0;
	for (i = 0; i < len; i++)
		diff |= (u_int8_t)c->token[i] ^ (u_int8_t)token[i];

	return (diff == 0);
}

/* The slot's token, if any, makes way for this one. */
static void
auth_cache_put(struct auth_cached *c, const char *token, size_t len,
    const struct identity *id)
{
	if (len > AUTH_CACHE_TOKEN_MAX)
		return;

	kore_free(c->token);
	c->token = kore_malloc(len);
	memcpy(c->token, token, len);
	c->len = len;
	c->id = *id;
}

/* base64url header.payload.signature: nothing else reaches libjwt. */
static int
auth_token_shape(const char *token)
{
	size_t		len, dots;
	const char	*p;

	dots = 0;
	for (p = token; *p != '\0'; p++) {
		if (*p == '.')
			dots++;
		else if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_')
			return (0);
	}

	len = (size_t)(p - token);
	return (len > 0 && len <= TOKEN_MAX && dots == 2);
}

static int
auth_claims(yajl_val root, struct identity *id)
{
	const char	*path[] = { NULL, NULL };
	const char	*s;
	int64_t		now, exp, nbf;
	int		rc;

	now = util_now();

	if (!auth_claim_time(root, "exp", 1, &exp))
		return (AUTH_INVALID);
	if (now > exp + CLOCK_LEEWAY)
		return (AUTH_EXPIRED);
	id->exp = exp;

	if (!auth_claim_time(root, "nbf", 0, &nbf))
		return (AUTH_INVALID);
	if (nbf != 0 && now + CLOCK_LEEWAY < nbf)
		return (AUTH_INVALID);

	if ((s = auth_claim_string(root, "token_type")) != NULL &&
	    !strcmp(s, "refresh"))
		return (AUTH_INVALID);

	if (parley_cfg.jwt_issuer != NULL &&
	    ((s = auth_claim_string(root, "iss")) == NULL ||
	    strcmp(s, parley_cfg.jwt_issuer)))
		return (AUTH_INVALID);

	if (parley_cfg.jwt_audience != NULL &&
	    !auth_claim_has_word(root, "aud", parley_cfg.jwt_audience))
		return (AUTH_INVALID);

	if (auth_claim_has_word(root, "scope", "service")) {
		id->service = 1;
		(void)kore_strlcpy(id->name, "service", sizeof(id->name));
		return (AUTH_OK);
	}

	/* A present but invalid user_id never falls back to sub. */
	path[0] = "user_id";
	if (yajl_tree_get(root, path, yajl_t_any) != NULL)
		rc = auth_claim_user(root, "user_id", id);
	else
		rc = auth_claim_user(root, "sub", id);
	if (rc != AUTH_OK)
		return (rc);

	if ((s = auth_claim_string(root, "name")) == NULL || *s == '\0')
		s = auth_claim_string(root, "username");

	if (s != NULL && *s != '\0') {
		auth_copy_name(id->name, sizeof(id->name), s);
	} else {
		(void)snprintf(id->name, sizeof(id->name), "user %s",
		    id->user_id);
	}

	return (AUTH_OK);
}

/* A NumericDate claim; `required` says whether it must be there. */
static int
auth_claim_time(yajl_val root, const char *name, int required, int64_t *out)
{
	const char	*path[] = { name, NULL };
	yajl_val	v;
	double		d;

	*out = 0;
	if ((v = yajl_tree_get(root, path, yajl_t_any)) == NULL)
		return (!required);

	if (YAJL_IS_INTEGER(v)) {
		*out = YAJL_GET_INTEGER(v);
		return (KORE_RESULT_OK);
	}

	if (YAJL_IS_DOUBLE(v)) {
		d = YAJL_GET_DOUBLE(v);
		if (d < 0 || d > 1e15)
			return (KORE_RESULT_ERROR);
		*out = (int64_t)d;
		return (KORE_RESULT_OK);
	}

	return (KORE_RESULT_ERROR);
}

/* User ids are strings of 1-64 bytes or integers (7 is the user "7"). */
static int
auth_claim_user(yajl_val root, const char *name, struct identity *id)
{
	const char	*path[] = { name, NULL };
	const char	*s;
	yajl_val	v;

	if ((v = yajl_tree_get(root, path, yajl_t_any)) == NULL)
		return (AUTH_INVALID);

	if (YAJL_IS_STRING(v))
		s = v->u.string;
	else if (YAJL_IS_INTEGER(v))
		s = YAJL_GET_NUMBER(v);
	else
		return (AUTH_INVALID);

	if (s == NULL || s[0] == '\0' || strlen(s) > PARLEY_USER_ID_MAX)
		return (AUTH_INVALID);

	(void)kore_strlcpy(id->user_id, s, sizeof(id->user_id));
	return (AUTH_OK);
}

static const char *
auth_claim_string(yajl_val root, const char *name)
{
	const char	*path[] = { name, NULL };
	yajl_val	v;

	if ((v = yajl_tree_get(root, path, yajl_t_any)) == NULL ||
	    !YAJL_IS_STRING(v))
		return (NULL);

	return (v->u.string);
}

/* A claim that is a space-separated string or an array of strings. */
static int
auth_claim_has_word(yajl_val root, const char *name, const char *word)
{
	const char	*path[] = { name, NULL };
	const char	*s, *p;
	yajl_val	v;
	size_t		i, wlen;

	if ((v = yajl_tree_get(root, path, yajl_t_any)) == NULL)
		return (0);

	if (YAJL_IS_ARRAY(v)) {
		for (i = 0; i < v->u.array.len; i++) {
			s = YAJL_GET_STRING(v->u.array.values[i]);
			if (s != NULL && !strcmp(s, word))
				return (1);
		}
		return (0);
	}

	if (!YAJL_IS_STRING(v))
		return (0);
	s = v->u.string;

	wlen = strlen(word);
	for (p = s; (p = strstr(p, word)) != NULL; p += wlen) {
		if ((p == s || p[-1] == ' ') &&
		    (p[wlen] == '\0' || p[wlen] == ' '))
			return (1);
	}

	return (0);
}

/* Truncate a display name without splitting a UTF-8 sequence. */
static void
auth_copy_name(char *dst, size_t dlen, const char *src)
{
	size_t		len;

	len = strlen(src);
	if (len >= dlen) {
		len = dlen - 1;
		while (len > 0 && ((unsigned char)src[len] & 0xc0) == 0x80)
			len--;
	}

	memcpy(dst, src, len);
	dst[len] = '\0';
}

/* "parley, bearer.<token>": the token rides in the subprotocol list. */
static const char *
auth_subprotocol_token(const char *hdr, char *buf, size_t len)
{
	const char	*p, *end;
	size_t		n;

	for (p = hdr; *p != '\0'; p = end) {
		while (*p == ' ' || *p == ',')
			p++;
		end = p + strcspn(p, ",");
		n = (size_t)(end - p);
		while (n > 0 && p[n - 1] == ' ')
			n--;
		if (n > 7 && !strncmp(p, "bearer.", 7)) {
			/* An oversized token must fail, not fall through. */
			if (n - 7 >= len)
				n = 7;
			memcpy(buf, p + 7, n - 7);
			buf[n - 7] = '\0';
			return (buf);
		}
	}

	return (NULL);
}
