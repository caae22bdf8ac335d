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
 * The little JSON writing Parley does in C: most frames are rendered by
 * PostgreSQL and passed through untouched, so all we need is a correct
 * string escaper and UTF-8 checks for what clients send.
 */

#include <sys/types.h>

#include <stdio.h>
#include <string.h>

#include "parley.h"

#define JSON_DEPTH_MAX		64

static int	json_depth_ok(const u_int8_t *, size_t);
static int	json_strings_valid(yajl_val);

/* Append s (len bytes of valid UTF-8) as a quoted JSON string. */
void
json_append_string(struct kore_buf *buf, const char *s, size_t len)
{
	const u_int8_t	*p, *end, *run;
	char		esc[8];

	util_buf_reserve(buf, len + 2);
	kore_buf_append(buf, "\"", 1);

	run = (const u_int8_t *)s;
	end = run + len;
	for (p = run; p < end; p++) {
		if (*p >= 0x20 && *p != '"' && *p != '\\')
			continue;

		kore_buf_append(buf, run, p - run);
		switch (*p) {
		case '"':
			kore_buf_append(buf, "\\\"", 2);
			break;
		case '\\':
			kore_buf_append(buf, "\\\\", 2);
			break;
		case '\n':
			kore_buf_append(buf, "\\n", 2);
			break;
		case '\r':
			kore_buf_append(buf, "\\r", 2);
			break;
		case '\t':
			kore_buf_append(buf, "\\t", 2);
			break;
		default:
			(void)snprintf(esc, sizeof(esc), "\\u%04x", *p);
			kore_buf_append(buf, esc, 6);
			break;
		}
		run = p + 1;
	}

	kore_buf_append(buf, run, end - run);
	kore_buf_append(buf, "\"", 1);
}

/* Strict UTF-8 (RFC 3629): no overlongs, surrogates or > U+10FFFF. */
int
json_utf8_valid(const u_int8_t *s, size_t len)
{
	size_t		i, n, k;
	u_int32_t	cp, min;

	for (i = 0; i < len; i += n) {
		if (s[i] < 0x80) {
			n = 1;
			continue;
		} else if ((s[i] & 0xe0) == 0xc0) {
			n = 2;
			cp = s[i] & 0x1f;
			min = 0x80;
		} else if ((s[i] & 0xf0) == 0xe0) {
			n = 3;
			cp = s[i] & 0x0f;
			min = 0x800;
		} else if ((s[i] & 0xf8) == 0xf0) {
			n = 4;
			cp = s[i] & 0x07;
			min = 0x10000;
		} else {
			return (0);
		}

		if (i + n > len)
			return (0);
		for (k = 1; k < n; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return (0);
			cp = (cp << 6) | (s[i + k] & 0x3f);
		}

		if (cp < min || cp > 0x10ffff ||
		    (cp >= 0xd800 && cp <= 0xdfff))
			return (0);
	}

	return (1);
}

/* Code points in valid UTF-8: every byte that does not continue one. */
size_t
json_utf8_length(const u_int8_t *s, size_t len)
{
	size_t		i, n;

	n = 0;
	for (i = 0; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			n++;
	}

	return (n);
}

/*
 * Write a parsed value back out as compact JSON. Fails on a number no
 * double holds (1e400, a 400-digit integer): PostgreSQL may refuse it
 * (jsonb's numeric takes exponents up to 1000 only) and no JavaScript
 * client could read it.
 */
int
json_serialize(struct kore_buf *buf, yajl_val v)
{
	size_t		i;

	if (v == NULL || YAJL_IS_NULL(v)) {
		kore_buf_append(buf, "null", 4);
	} else if (YAJL_IS_TRUE(v)) {
		kore_buf_append(buf, "true", 4);
	} else if (YAJL_IS_FALSE(v)) {
		kore_buf_append(buf, "false", 5);
	} else if (YAJL_IS_NUMBER(v)) {
		if (!YAJL_IS_DOUBLE(v))
			return (0);
		kore_buf_appendf(buf, "%s", v->u.number.r);
	} else if (YAJL_IS_STRING(v)) {
		json_append_string(buf, v->u.string, strlen(v->u.string));
	} else if (YAJL_IS_ARRAY(v)) {
		kore_buf_append(buf, "[", 1);
		for (i = 0; i < v->u.array.len; i++) {
			if (i > 0)
				kore_buf_append(buf, ",", 1);
			if (!json_serialize(buf, v->u.array.values[i]))
				return (0);
		}
		kore_buf_append(buf, "]", 1);
	} else if (YAJL_IS_OBJECT(v)) {
		kore_buf_append(buf, "{", 1);
		for (i = 0; i < v->u.object.len; i++) {
			if (i > 0)
				kore_buf_append(buf, ",", 1);
			json_append_string(buf, v->u.object.keys[i],
			    strlen(v->u.object.keys[i]));
			kore_buf_append(buf, ":", 1);
			if (!json_serialize(buf, v->u.object.values[i]))
				return (0);
		}
		kore_buf_append(buf, "}", 1);
	}

	return (1);
}

/*
 * Whether arrays and objects nest at most JSON_DEPTH_MAX deep: yajl frees
 * and we serialise trees recursively, so a frame of 60,000 brackets must
 * not reach them.
 */
static int
json_depth_ok(const u_int8_t *s, size_t len)
{
	size_t		i, depth;
	int		in_string;

	depth = 0;
	in_string = 0;
	for (i = 0; i < len; i++) {
		if (in_string) {
			if (s[i] == '\\')
				i++;
			else if (s[i] == '"')
				in_string = 0;
		} else if (s[i] == '"') {
			in_string = 1;
		} else if (s[i] == '[' || s[i] == '{') {
			if (++depth > JSON_DEPTH_MAX)
				return (0);
		} else if ((s[i] == ']' || s[i] == '}') && depth > 0) {
			depth--;
		}
	}

	return (1);
}

/* Parse len bytes (not NUL-terminated) of UTF-8 JSON; NULL if invalid. */
yajl_val
json_parse(const void *data, size_t len)
{
	char		*text;
	yajl_val	v;

	if (!json_utf8_valid(data, len) || memchr(data, '\0', len) != NULL ||
	    !json_depth_ok(data, len))
		return (NULL);

	text = kore_malloc(len + 1);
	memcpy(text, data, len);
	text[len] = '\0';
	v = yajl_tree_parse(text, NULL, 0);
	kore_free(text);

	/* Escapes such as a lone "\udc00" decode to no character at all. */
	if (v != NULL && !json_strings_valid(v)) {
		yajl_tree_free(v);
		return (NULL);
	}

	return (v);
}

/* Every string and key of a parsed tree is valid UTF-8. */
static int
json_strings_valid(yajl_val v)
{
	size_t		i;

	if (YAJL_IS_STRING(v))
		return (json_utf8_valid((const u_int8_t *)v->u.string,
		    strlen(v->u.string)));

	if (YAJL_IS_ARRAY(v)) {
		for (i = 0; i < v->u.array.len; i++) {
			if (!json_strings_valid(v->u.array.values[i]))
				return (0);
		}
	}

	if (YAJL_IS_OBJECT(v)) {
		for (i = 0; i < v->u.object.len; i++) {
			if (!json_utf8_valid((const u_int8_t *)
			    v->u.object.keys[i], strlen(v->u.object.keys[i])) ||
			    !json_strings_valid(v->u.object.values[i]))
				return (0);
		}
	}

	return (1);
}

/*
 * Whether a JSON text holds the escape \u0000. yajl decodes it into a C
 * string that ends there, and PostgreSQL text and jsonb cannot hold it:
 * refuse it rather than store a silently shortened value. Every backslash
 * in JSON starts an escape, so skipping escapes whole is exact.
 */
int
json_has_nul(const void *data, size_t len)
{
	const u_int8_t	*p = data;
	size_t		i;

	for (i = 0; i + 1 < len; i++) {
		if (p[i] != '\\')
			continue;
		if (p[i + 1] == 'u' && i + 5 < len &&
		    !memcmp(p + i + 2, "0000", 4))
			return (1);
		i++;
	}

	return (0);
}
