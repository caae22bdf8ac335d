/*
 * loadgen: an event-driven WebSocket load generator for Parley.
 *
 * One process, one thread, one epoll set: it opens many thousands of
 * chat sockets (optionally from several source addresses), mints its own
 * HS256 tokens, offers an open-loop message rate spread evenly over the
 * senders, tracks every message to every other socket of its conversation
 * (delivered, duplicated, lost, out of order, misrouted), measures the
 * delivery latency from the time stamp embedded in the message text, can
 * drop and reconnect sockets at once with after=<last id seen> (a
 * reconnect storm), and reports its own CPU next to every figure as one
 * JSON line on standard output.
 *
 * It speaks the compatibility send form {"message":"...","type":"TEXT"}
 * (or the canonical one) and reads {"type":"message"} events, so it can
 * drive any server that speaks that format.
 */

#define _GNU_SOURCE

#include <sys/types.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/queue.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#define WS_GUID		"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define IOBUF_SIZE	(256 * 1024)
#define MAX_FRAME	(16 * 1024 * 1024)
#define MAX_HEADER	16384
#define MAX_EVENTS	1024
#define MAX_SRC		64
#define MAX_CODES	32

#define H_LINEAR	128
#define H_SUB		64
#define H_EXP_MAX	47
#define H_BUCKETS	(H_LINEAR + (H_EXP_MAX - 7 + 1) * H_SUB)

enum cstate {
	CS_IDLE,	/* not started, or dropped and waiting */
	CS_CONNECTING,	/* TCP connect in progress */
	CS_HANDSHAKE,	/* upgrade request sent, waiting for 101 */
	CS_WAITREADY,	/* upgraded, waiting for the ready frame */
	CS_OPEN,	/* ready received */
	CS_DEAD		/* failed or closed, not coming back */
};

enum queue {
	Q_NONE,
	Q_LAUNCH,	/* waiting to be started */
	Q_PENDING	/* in flight, subject to the connect timeout */
};

enum auth_mode {
	AUTH_QUERY,
	AUTH_SUBPROTOCOL,
	AUTH_HEADER
};

struct buf {
	char		*data;
	size_t		 off;
	size_t		 len;
	size_t		 cap;
};

struct conn {
	TAILQ_ENTRY(conn)	 q;
	int			 fd;
	uint8_t			 state;
	uint8_t			 queue;
	uint8_t			 want_out;
	uint8_t			 syncing;	/* waiting for synced */
	uint8_t			 dropped;	/* by the storm */
	uint8_t			 fragop;
	uint8_t			 ever_open;
	uint32_t		 idx;		/* global index */
	uint32_t		 conv;		/* conversation index */
	uint32_t		 slot;		/* socket slot in it */
	uint32_t		 attempts;
	int64_t			 last_id;	/* highest id seen */
	uint64_t		 t_start;	/* connect started */
	uint64_t		 t_due;		/* launch not before */
	char			 key[32];	/* Sec-WebSocket-Key */
	struct buf		 rbuf;
	struct buf		 wbuf;
	struct buf		 frag;
};

TAILQ_HEAD(connq, conn);

struct msg {
	uint64_t	 t_send;	/* monotonic us, as embedded */
	uint64_t	 t_first;	/* first copy seen, by anyone */
	int64_t		 server_id;
	uint32_t	 sender;	/* slot */
	uint32_t	 ndeliv;	/* non-sender deliveries */
};

struct conv {
	int64_t		 id;
	uint32_t	 nmsg;
	uint32_t	 capmsg;
	struct msg	*msgs;
	uint8_t		*bits;		/* nmsg * bpm bytes */
};

struct hist {
	uint64_t	 count;
	uint64_t	 sum;
	uint64_t	 max;
	uint64_t	 b[H_BUCKETS];
};

struct codecount {
	int		 code;
	uint64_t	 count;
	char		 name[40];
};

struct opts {
	const char	*url;
	const char	*api_url;
	const char	*chat_path;
	const char	*secret;
	const char	*prefix;
	const char	*conv_file;
	const char	*conv_ids;
	const char	*mint;
	const char	*label;
	const char	*source_ips;
	int		 nconv;
	int		 users;
	int		 sockets_per_user;
	int		 senders;
	double		 rate;
	double		 duration;
	double		 grace;
	double		 ping_interval;
	double		 connect_timeout;
	int		 concurrency;
	int		 idle;
	int		 create;
	int		 create_only;
	int		 canonical;
	int		 auth;
	int		 no_ready;
	int		 msg_size;
	int		 retries;
	int		 reconnect;
	int		 progress;
	int		 show_lost;
	int		 conv_offset;
	int		 no_kernel_ts;
	int		 coalesce_us;
	long		 token_ttl;
	int		 storm;
	double		 storm_at;
	double		 storm_down;
	int		 storm_concurrency;
};

struct stats {
	uint64_t	 connected;	/* ready frames on first connect */
	uint64_t	 reconnected;
	uint64_t	 err_connect;
	uint64_t	 err_addr;
	uint64_t	 err_fdlimit;
	uint64_t	 err_timeout;
	uint64_t	 err_http;
	uint64_t	 err_accept;
	uint64_t	 err_eof;
	uint64_t	 err_io;
	uint64_t	 err_proto;
	uint64_t	 closes;
	uint64_t	 sent;
	uint64_t	 skipped;
	uint64_t	 sent_bytes;
	uint64_t	 acks;
	uint64_t	 delivered;
	uint64_t	 delivered_live;
	uint64_t	 replayed;
	uint64_t	 echoes;
	uint64_t	 duplicates;
	uint64_t	 out_of_order;
	uint64_t	 id_mismatch;
	uint64_t	 misrouted;
	uint64_t	 foreign;
	uint64_t	 pings;
	uint64_t	 pongs;
	uint64_t	 server_errors;
	uint64_t	 other_events;
	uint64_t	 frames_in;
	uint64_t	 bytes_in;
	uint64_t	 max_wbuf;
	uint64_t	 expected;	/* deliveries expected */
	int		 open;
	int		 inflight;
	struct hist	 lat;		/* live delivery latency */
	struct hist	 lat_iv;	/* same, this progress interval */
	struct hist	 echo;		/* sender's own copy */
	struct hist	 lag;		/* send time minus schedule */
	struct hist	 conn_lat;	/* connect start to ready */
	struct hist	 catchup;	/* storm: reconnect to synced */
	struct codecount closecodes[MAX_CODES];
	int		 nclosecodes;
	struct codecount errcodes[MAX_CODES];
	int		 nerrcodes;
};

struct storm {
	int		 state;		/* off armed down up */
	int		 dropped;
	int		 caught;
	int		 reopened;
	uint64_t	 t_drop;
	uint64_t	 t_reconnect;
	uint64_t	 t_all_open;
	uint64_t	 t_all_caught;
	uint64_t	 sent_while_down;
};

static struct opts	 o;
static struct stats	 st;
static struct storm	 storm;
static struct conn	*conns;
static struct conv	*convs;
static int		 nconns;
static int		 nslots;	/* sockets per conversation */
static size_t		 bpm;		/* bitmap bytes per message */
static int		 nsenders;
static int		 epfd = -1;
static uint32_t		 runid;
static uint64_t		 rng_state;
static uint64_t		 t_recv;	/* time of the current read */
static int64_t		 rt_offset;	/* realtime - monotonic */
static volatile sig_atomic_t interrupted;

static struct sockaddr_storage	 dst;
static socklen_t		 dstlen;
static char			 hostport[300];
static struct sockaddr_storage	 src[MAX_SRC];
static socklen_t		 srclen[MAX_SRC];
static int			 nsrc;

static struct connq	 launchq = TAILQ_HEAD_INITIALIZER(launchq);
static struct connq	 pendq = TAILQ_HEAD_INITIALIZER(pendq);

static char		 iobuf[IOBUF_SIZE];
static char		 scratch[IOBUF_SIZE];

static void	 usage(void) __attribute__((noreturn));
static void	 fatal(const char *, ...)
		    __attribute__((noreturn, format(printf, 1, 2)));
static void	 conn_close(struct conn *, int);
static void	 conn_write(struct conn *, const void *, size_t);
static size_t	 conn_input(struct conn *, const char *, size_t);

/* Utilities. */

static void
fatal(const char *fmt, ...)
{
	va_list	ap;

	va_start(ap, fmt);
	fprintf(stderr, "loadgen: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static void
note(const char *fmt, ...)
{
	va_list	ap;

	va_start(ap, fmt);
	fprintf(stderr, "loadgen: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
}

static void *
xcalloc(size_t n, size_t sz)
{
	void	*p;

	if ((p = calloc(n, sz)) == NULL)
		fatal("out of memory");
	return (p);
}

static void *
xrealloc(void *p, size_t sz)
{
	if ((p = realloc(p, sz)) == NULL)
		fatal("out of memory");
	return (p);
}

static uint64_t
now_us(void)
{
	struct timespec	ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ((uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000);
}

static void
clock_sync(void)
{
	struct timespec	r, m;

	clock_gettime(CLOCK_REALTIME, &r);
	clock_gettime(CLOCK_MONOTONIC, &m);
	rt_offset = ((int64_t)r.tv_sec - (int64_t)m.tv_sec) * 1000000 +
	    (r.tv_nsec - m.tv_nsec) / 1000;
}

static uint64_t
cpu_us(void)
{
	struct rusage	ru;

	getrusage(RUSAGE_SELF, &ru);
	return ((uint64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec +
	    (uint64_t)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec);
}

static long
maxrss_kb(void)
{
	struct rusage	ru;

	getrusage(RUSAGE_SELF, &ru);
	return (ru.ru_maxrss);
}

static void
cpu_split(uint64_t *user, uint64_t *sys)
{
	struct rusage	ru;

	getrusage(RUSAGE_SELF, &ru);
	*user = (uint64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec;
	*sys = (uint64_t)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec;
}

static uint64_t
rng(void)
{
	/* xorshift64*: only for frame masks, which need no secrecy. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (rng_state * 2685821657736338717ULL);
}

static void
buf_append(struct buf *b, const void *p, size_t n)
{
	size_t	ncap;

	if (b->off > 0 && b->len + n > b->cap) {
		memmove(b->data, b->data + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
	}
	if (b->len + n > b->cap) {
		ncap = b->cap ? b->cap * 2 : 512;
		while (ncap < b->len + n)
			ncap *= 2;
		b->data = xrealloc(b->data, ncap);
		b->cap = ncap;
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
}

static void
buf_free(struct buf *b)
{
	free(b->data);
	memset(b, 0, sizeof(*b));
}

static void
buf_consume(struct buf *b, size_t n)
{
	b->off += n;
	if (b->off >= b->len) {
		if (b->cap > 65536)
			buf_free(b);
		else
			b->off = b->len = 0;
	}
}

static size_t
buf_avail(const struct buf *b)
{
	return (b->len - b->off);
}

/* Histogram: linear below 128 us, then 64 sub-buckets per power of two. */

static int
hist_index(uint64_t v)
{
	int	e;

	if (v < H_LINEAR)
		return ((int)v);
	e = 63 - __builtin_clzll(v);
	if (e > H_EXP_MAX)
		return (H_BUCKETS - 1);
	return (H_LINEAR + (e - 7) * H_SUB +
	    (int)((v >> (e - 6)) & (H_SUB - 1)));
}

static uint64_t
hist_value(int i)
{
	uint64_t	lo, w;
	int		e, sub;

	if (i < H_LINEAR)
		return ((uint64_t)i);
	e = (i - H_LINEAR) / H_SUB + 7;
	sub = (i - H_LINEAR) % H_SUB;
	lo = (uint64_t)(H_SUB + sub) << (e - 6);
	w = (uint64_t)1 << (e - 6);
	return (lo + w / 2);
}

static void
hist_add(struct hist *h, uint64_t v)
{
	h->b[hist_index(v)]++;
	h->count++;
	h->sum += v;
	if (v > h->max)
		h->max = v;
}

static uint64_t
hist_pct(const struct hist *h, double p)
{
	uint64_t	rank, cum;
	uint64_t	v;
	int		i;

	if (h->count == 0)
		return (0);
	rank = (uint64_t)(p * (double)h->count + 0.999999);
	if (rank < 1)
		rank = 1;
	cum = 0;
	for (i = 0; i < H_BUCKETS; i++) {
		cum += h->b[i];
		if (cum >= rank) {
			v = hist_value(i);
			return (v > h->max ? h->max : v);
		}
	}
	return (h->max);
}

static void
hist_json(FILE *f, const char *name, const struct hist *h)
{
	fprintf(f, "\"%s\":{\"count\":%" PRIu64 ",\"mean\":%.3f,"
	    "\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"p999\":%.3f,"
	    "\"max\":%.3f}", name, h->count,
	    h->count ? (double)h->sum / (double)h->count / 1000.0 : 0.0,
	    hist_pct(h, 0.50) / 1000.0, hist_pct(h, 0.90) / 1000.0,
	    hist_pct(h, 0.99) / 1000.0, hist_pct(h, 0.999) / 1000.0,
	    h->max / 1000.0);
}

static void
code_count(struct codecount *t, int *n, int code, const char *raw,
    size_t rawlen)
{
	char	name[sizeof(t[0].name)];
	size_t	namelen = 0, j;
	int	i;

	/* Server text: keep what can go between JSON quotes as it is. */
	for (j = 0; j < rawlen && namelen + 1 < sizeof(name); j++) {
		if (raw[j] == '"' || raw[j] == '\\' ||
		    (unsigned char)raw[j] < 0x20)
			continue;
		name[namelen++] = raw[j];
	}
	for (i = 0; i < *n; i++) {
		if (t[i].code == code && strlen(t[i].name) == namelen &&
		    memcmp(t[i].name, name, namelen) == 0) {
			t[i].count++;
			return;
		}
	}
	if (*n == MAX_CODES)
		i = MAX_CODES - 1;
	else
		i = (*n)++;
	t[i].code = code;
	memcpy(t[i].name, name, namelen);
	t[i].name[namelen] = '\0';
	t[i].count++;
}

/* Base64 and tokens. */

static size_t
b64(char *out, const unsigned char *in, size_t n)
{
	return ((size_t)EVP_EncodeBlock((unsigned char *)out, in, (int)n));
}

static size_t
b64url(char *out, const unsigned char *in, size_t n)
{
	size_t	len, i;

	len = b64(out, in, n);
	while (len > 0 && out[len - 1] == '=')
		len--;
	out[len] = '\0';
	for (i = 0; i < len; i++) {
		if (out[i] == '+')
			out[i] = '-';
		else if (out[i] == '/')
			out[i] = '_';
	}
	return (len);
}

static void
user_name(char *out, size_t sz, int conv, int user)
{
	snprintf(out, sz, "%s%d_%d", o.prefix, o.conv_offset + conv, user);
}

/* Mint an HS256 JWT with claims user_id, name and exp. */
static void
mint_token(char *out, size_t sz, const char *user)
{
	static const char	 hdr[] = "{\"alg\":\"HS256\",\"typ\":\"JWT\"}";
	unsigned char		 mac[EVP_MAX_MD_SIZE];
	unsigned int		 maclen;
	char			 claims[512], body[1024];
	size_t			 n;

	snprintf(claims, sizeof(claims),
	    "{\"user_id\":\"%s\",\"name\":\"%s\",\"exp\":%lld}", user, user,
	    (long long)time(NULL) + o.token_ttl);
	n = b64url(body, (const unsigned char *)hdr, strlen(hdr));
	body[n++] = '.';
	n += b64url(body + n, (const unsigned char *)claims, strlen(claims));
	if (HMAC(EVP_sha256(), o.secret, (int)strlen(o.secret),
	    (unsigned char *)body, n, mac, &maclen) == NULL)
		fatal("HMAC failed");
	body[n++] = '.';
	n += b64url(body + n, mac, maclen);
	if (n + 1 > sz)
		fatal("token too long");
	memcpy(out, body, n + 1);
}

/* A minimal JSON walker: enough to pick members out of an object. */

static const char *
json_ws(const char *p, const char *e)
{
	while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
		p++;
	return (p);
}

static const char *
json_skip_string(const char *p, const char *e)
{
	const char	*s = p + 1, *q, *b;

	for (p = s; p < e; p = q + 1) {
		if ((q = memchr(p, '"', (size_t)(e - p))) == NULL)
			return (NULL);
		/* Escaped when an odd number of backslashes precede it. */
		for (b = q; b > s && b[-1] == '\\'; b--)
			;
		if (((q - b) & 1) == 0)
			return (q + 1);
	}
	return (NULL);
}

static const char *
json_skip(const char *p, const char *e)
{
	int	depth = 0;

	p = json_ws(p, e);
	if (p >= e)
		return (NULL);
	if (*p == '"')
		return (json_skip_string(p, e));
	if (*p == '{' || *p == '[') {
		while (p < e) {
			if (*p == '"') {
				if ((p = json_skip_string(p, e)) == NULL)
					return (NULL);
				continue;
			}
			if (*p == '{' || *p == '[')
				depth++;
			else if (*p == '}' || *p == ']') {
				if (--depth == 0)
					return (p + 1);
			}
			p++;
		}
		return (NULL);
	}
	while (p < e && *p != ',' && *p != '}' && *p != ']' &&
	    !isspace((unsigned char)*p))
		p++;
	return (p);
}

struct jspan {
	const char	*s;
	const char	*e;
};

/*
 * One pass over the object at p: for each of the n keys found, fill in
 * the span of its value.  Returns the number found, or -1 when the text
 * is not an object.
 */
static int
json_get(const char *p, const char *e, const char **keys, int n,
    struct jspan *out)
{
	const char	*ks, *q, *v;
	size_t		 kl, lens[16];
	int		 i, found = 0;

	if (n > 16)
		fatal("json_get: too many keys");
	for (i = 0; i < n; i++) {
		out[i].s = out[i].e = NULL;
		lens[i] = strlen(keys[i]);
	}
	p = json_ws(p, e);
	if (p >= e || *p != '{')
		return (-1);
	p++;
	for (;;) {
		p = json_ws(p, e);
		if (p >= e || *p != '"')
			return (found);
		ks = p + 1;
		if ((q = json_skip_string(p, e)) == NULL)
			return (found);
		kl = (size_t)(q - 1 - ks);
		p = json_ws(q, e);
		if (p >= e || *p != ':')
			return (found);
		v = json_ws(p + 1, e);
		if ((p = json_skip(v, e)) == NULL)
			return (found);
		for (i = 0; i < n; i++) {
			if (out[i].s == NULL && lens[i] == kl &&
			    memcmp(keys[i], ks, kl) == 0) {
				out[i].s = v;
				out[i].e = p;
				found++;
				break;
			}
		}
		if (found == n)
			return (found);
		p = json_ws(p, e);
		if (p < e && *p == ',') {
			p++;
			continue;
		}
		return (found);
	}
}

static int
span_is(const struct jspan *s, const char *lit)
{
	size_t	n = strlen(lit);

	return (s->s != NULL && (size_t)(s->e - s->s) == n &&
	    memcmp(s->s, lit, n) == 0);
}

static int
span_int(const struct jspan *s, int64_t *v)
{
	const char	*p = s->s;
	int64_t		 x = 0;
	int		 neg = 0;

	if (p == NULL || p >= s->e)
		return (-1);
	if (*p == '"')
		p++;
	if (*p == '-') {
		neg = 1;
		p++;
	}
	if (p >= s->e || !isdigit((unsigned char)*p))
		return (-1);
	while (p < s->e && isdigit((unsigned char)*p))
		x = x * 10 + (*p++ - '0');
	*v = neg ? -x : x;
	return (0);
}

/* The string's raw text between its quotes (escapes are left as they are). */
static int
span_str(const struct jspan *s, const char **p, size_t *n)
{
	if (s->s == NULL || s->e - s->s < 2 || *s->s != '"')
		return (-1);
	*p = s->s + 1;
	*n = (size_t)(s->e - s->s - 2);
	return (0);
}

/* Options and set-up. */

static void
usage(void)
{
	fprintf(stderr,
"usage: loadgen --url ws://host:port --secret S [options]\n"
"  --chat-path FMT           socket path, printf with the conversation id\n"
"                            (default /ws/chat/%%d/)\n"
"  --api-url http://h:p      REST base for --create (default from --url)\n"
"  --conversations N         conversations (default 1)\n"
"  --users-per-conversation K  users per conversation, named <prefix><i>_<k>\n"
"  --sockets-per-user S      sockets each user opens (default 1)\n"
"  --senders M               senders per conversation (default K)\n"
"  --user-prefix P           user name prefix (default b)\n"
"  --conv-offset I           number of the first conversation in user names\n"
"                            (to split one population over processes)\n"
"  --conv-file F             conversation ids, one a line\n"
"  --conv-ids 1,2,3          conversation ids on the command line\n"
"  --create                  create the conversations by REST first\n"
"  --create-only             create them, write --conv-file, and exit\n"
"  --rate R                  offered messages/s in total (open loop)\n"
"  --duration S              seconds of traffic, or of holding with --idle\n"
"  --grace S                 seconds to wait for deliveries after (default 5)\n"
"  --msg-size N              pad message text to N bytes\n"
"  --canonical               send {\"type\":\"message\",\"content\":..}\n"
"  --auth query|subprotocol|header   where the token goes (default query)\n"
"  --source-ips A,B,..       bind() each socket to one of these first\n"
"  --concurrency N           connects in flight at once (default 256)\n"
"  --connect-timeout S       per socket, to the ready frame (default 15)\n"
"  --retries N               retries of a failed first connect (default 0)\n"
"  --no-ready                count a socket open at 101 (no ready frame)\n"
"  --idle                    no messages: open, heartbeat, hold\n"
"  --ping-interval S         seconds between pings per socket (30; 0: none)\n"
"  --reconnect               reconnect closed sockets with after=<last id>\n"
"  --storm N                 drop N sockets at once, reconnect with after=\n"
"  --storm-at S              seconds into the run (default duration/3)\n"
"  --storm-down S            seconds they stay down (default 1)\n"
"  --storm-concurrency N     reconnects in flight (default 0: all at once)\n"
"  --token-ttl S             token lifetime (default 86400)\n"
"  --label L                 copied into the result\n"
"  --progress                a line per second on stderr\n"
"  --show-lost N             name up to N lost deliveries on stderr\n"
"  --coalesce-us N           wait N us (default 500) before polling after a\n"
"                            small batch of events: fewer wake-ups\n"
"                            (latencies use kernel receive times anyway)\n"
"  --no-kernel-timestamps    time deliveries at read() instead\n"
"  --mint USER               print a token for USER and exit\n");
	exit(2);
}

static void
parse_hostport(const char *url, const char *scheme1, const char *scheme2,
    char *host, size_t hostsz, char *port, size_t portsz)
{
	const char	*p, *colon, *slash;
	size_t		 n;

	if (strncmp(url, scheme1, strlen(scheme1)) == 0)
		p = url + strlen(scheme1);
	else if (strncmp(url, scheme2, strlen(scheme2)) == 0)
		p = url + strlen(scheme2);
	else
		fatal("url must start with %s: %s", scheme1, url);
	if ((slash = strchr(p, '/')) == NULL)
		slash = p + strlen(p);
	if (*p == '[') {
		if ((colon = strchr(p, ']')) == NULL || colon > slash)
			fatal("bad url %s", url);
		n = (size_t)(colon - p - 1);
		if (n >= hostsz)
			fatal("host too long");
		memcpy(host, p + 1, n);
		host[n] = '\0';
		colon = colon[1] == ':' ? colon + 1 : NULL;
	} else {
		colon = memchr(p, ':', (size_t)(slash - p));
		n = (size_t)((colon ? colon : slash) - p);
		if (n >= hostsz)
			fatal("host too long");
		memcpy(host, p, n);
		host[n] = '\0';
	}
	if (colon != NULL) {
		n = (size_t)(slash - colon - 1);
		if (n >= portsz)
			fatal("port too long");
		memcpy(port, colon + 1, n);
		port[n] = '\0';
	} else
		snprintf(port, portsz, "80");
}

static void
resolve(const char *host, const char *port, struct sockaddr_storage *ss,
    socklen_t *len)
{
	struct addrinfo	 hints, *res;
	int		 r;

	memset(&hints, 0, sizeof(hints));
	hints.ai_socktype = SOCK_STREAM;
	if ((r = getaddrinfo(host, port, &hints, &res)) != 0)
		fatal("%s:%s: %s", host, port, gai_strerror(r));
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	*len = res->ai_addrlen;
	freeaddrinfo(res);
}

static void
parse_sources(const char *list)
{
	char	*dup, *tok, *save = NULL;

	dup = strdup(list);
	for (tok = strtok_r(dup, ",", &save); tok != NULL;
	    tok = strtok_r(NULL, ",", &save)) {
		struct sockaddr_in	*s4;
		struct sockaddr_in6	*s6;

		if (nsrc == MAX_SRC)
			fatal("too many source addresses");
		memset(&src[nsrc], 0, sizeof(src[nsrc]));
		s4 = (struct sockaddr_in *)&src[nsrc];
		s6 = (struct sockaddr_in6 *)&src[nsrc];
		if (inet_pton(AF_INET, tok, &s4->sin_addr) == 1) {
			s4->sin_family = AF_INET;
			srclen[nsrc] = sizeof(*s4);
		} else if (inet_pton(AF_INET6, tok, &s6->sin6_addr) == 1) {
			s6->sin6_family = AF_INET6;
			srclen[nsrc] = sizeof(*s6);
		} else
			fatal("bad source address %s", tok);
		if (src[nsrc].ss_family != dst.ss_family)
			fatal("source %s is not of the target's family", tok);
		nsrc++;
	}
	free(dup);
}

static void
raise_nofile(rlim_t want)
{
	struct rlimit	rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == -1)
		fatal("getrlimit: %s", strerror(errno));
	if (rl.rlim_cur >= want)
		return;
	if (rl.rlim_max < want) {
		rl.rlim_max = want;
		rl.rlim_cur = want;
		if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
			return;
		getrlimit(RLIMIT_NOFILE, &rl);
		note("cannot raise the hard fd limit to %llu (%s); using %llu",
		    (unsigned long long)want, strerror(errno),
		    (unsigned long long)rl.rlim_max);
		want = rl.rlim_max;
	}
	rl.rlim_cur = want;
	if (setrlimit(RLIMIT_NOFILE, &rl) == -1)
		fatal("setrlimit: %s", strerror(errno));
}

static void
add_conv_id(int *n, int64_t id)
{
	if (*n >= o.nconv)
		return;
	convs[(*n)++].id = id;
}

static void
load_conv_ids(void)
{
	FILE	*f;
	char	 line[64], *dup, *tok, *save = NULL;
	int	 n = 0;

	if (o.conv_ids != NULL) {
		dup = strdup(o.conv_ids);
		for (tok = strtok_r(dup, ",", &save); tok != NULL;
		    tok = strtok_r(NULL, ",", &save))
			add_conv_id(&n, strtoll(tok, NULL, 10));
		free(dup);
	} else if (o.conv_file != NULL) {
		if ((f = fopen(o.conv_file, "r")) == NULL)
			fatal("%s: %s", o.conv_file, strerror(errno));
		while (fgets(line, sizeof(line), f) != NULL) {
			if (line[0] == '#' || line[0] == '\n')
				continue;
			add_conv_id(&n, strtoll(line, NULL, 10));
		}
		fclose(f);
	} else
		fatal("give --conv-file, --conv-ids or --create");
	if (n < o.nconv)
		fatal("%d conversation ids given, %d needed", n, o.nconv);
}

/* Blocking REST client, used only before the run to create conversations. */

static int
http_connect(const char *host, const char *port)
{
	struct sockaddr_storage	ss;
	struct timeval		tv = { 60, 0 };
	socklen_t		len;
	int			fd, one = 1;

	resolve(host, port, &ss, &len);
	if ((fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1)
		fatal("socket: %s", strerror(errno));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&ss, len) == -1)
		fatal("connect %s:%s: %s", host, port, strerror(errno));
	return (fd);
}

static int
write_all(int fd, const char *p, size_t n)
{
	ssize_t	w;

	while (n > 0) {
		if ((w = send(fd, p, n, MSG_NOSIGNAL)) == -1) {
			if (errno == EINTR)
				continue;
			return (-1);
		}
		p += w;
		n -= (size_t)w;
	}
	return (0);
}

/*
 * Send one request and read the response into body.  Returns the HTTP
 * status, or -1 when the connection failed (the caller reconnects).
 * *keep is cleared when the server closes the connection after it.
 */
static int
http_request(int fd, const char *req, size_t reqlen, struct buf *body,
    int *keep)
{
	struct buf	 in;
	char		*hend, *p, *q;
	ssize_t		 r;
	size_t		 hlen, clen = 0, need;
	int		 status, chunked = 0, have_len = 0;

	memset(&in, 0, sizeof(in));
	body->off = body->len = 0;
	*keep = 1;
	if (write_all(fd, req, reqlen) == -1)
		return (-1);
	for (;;) {
		if ((r = read(fd, iobuf, sizeof(iobuf))) <= 0) {
			if (r == -1 && errno == EINTR)
				continue;
			buf_free(&in);
			return (-1);
		}
		buf_append(&in, iobuf, (size_t)r);
		buf_append(&in, "", 1);
		in.len--;
		if ((hend = strstr(in.data, "\r\n\r\n")) != NULL)
			break;
	}
	hlen = (size_t)(hend - in.data) + 4;
	if (sscanf(in.data, "HTTP/1.%*d %d", &status) != 1) {
		buf_free(&in);
		return (-1);
	}
	*hend = '\0';
	if ((p = strcasestr(in.data, "\r\ncontent-length:")) != NULL) {
		clen = strtoul(p + 17, NULL, 10);
		have_len = 1;
	}
	if ((p = strcasestr(in.data, "\r\ntransfer-encoding:")) != NULL &&
	    strncasecmp(p + 20 + strspn(p + 20, " "), "chunked", 7) == 0)
		chunked = 1;
	if ((p = strcasestr(in.data, "\r\nconnection:")) != NULL &&
	    strncasecmp(p + 13 + strspn(p + 13, " "), "close", 5) == 0)
		*keep = 0;
	*hend = '\r';
	if (!have_len && !chunked)
		*keep = 0;
	for (;;) {
		p = in.data + hlen;
		need = in.len - hlen;
		if (chunked) {
			/* Decode what is there; done at the zero chunk. */
			size_t	pos = 0, sz;
			int	done = 0;

			body->off = body->len = 0;
			for (;;) {
				q = memmem(p + pos, need - pos, "\r\n", 2);
				if (q == NULL)
					break;
				sz = strtoul(p + pos, NULL, 16);
				if (sz == 0) {
					done = 1;
					break;
				}
				if ((size_t)(q - p) + 2 + sz + 2 > need)
					break;
				buf_append(body, q + 2, sz);
				pos = (size_t)(q - p) + 2 + sz + 2;
			}
			if (done)
				break;
		} else if (have_len && need >= clen) {
			buf_append(body, p, clen);
			break;
		}
		if ((r = read(fd, iobuf, sizeof(iobuf))) <= 0) {
			if (r == -1 && errno == EINTR)
				continue;
			if (r == 0 && !have_len && !chunked) {
				buf_append(body, p, need);
				break;
			}
			buf_free(&in);
			return (-1);
		}
		buf_append(&in, iobuf, (size_t)r);
	}
	buf_append(body, "", 1);
	body->len--;
	buf_free(&in);
	return (status);
}

static int64_t
parse_conversation_id(const char *p, size_t n)
{
	static const char	*k1[] = { "conversation", "id" };
	static const char	*k2[] = { "id" };
	struct jspan		 s[2], t;
	int64_t			 id;

	if (json_get(p, p + n, k1, 2, s) < 1)
		return (-1);
	if (s[0].s != NULL && *s[0].s == '{') {
		if (json_get(s[0].s, s[0].e, k2, 1, &t) == 1 &&
		    span_int(&t, &id) == 0)
			return (id);
		return (-1);
	}
	if (span_int(&s[1], &id) == 0)
		return (id);
	return (-1);
}

static void
create_conversations(void)
{
	struct buf	 req, body;
	char		 host[256], port[32], name[128], tok[1024];
	char		 line[512];
	const char	*api;
	FILE		*f = NULL;
	int64_t		 id;
	uint64_t	 t0;
	int		 fd, i, k, status, keep, tries;

	api = o.api_url;
	if (api == NULL)
		api = o.url;
	parse_hostport(api, "http://", "ws://", host, sizeof(host), port,
	    sizeof(port));
	if (o.conv_file != NULL && (f = fopen(o.conv_file, "w")) == NULL)
		fatal("%s: %s", o.conv_file, strerror(errno));
	memset(&req, 0, sizeof(req));
	memset(&body, 0, sizeof(body));
	fd = http_connect(host, port);
	t0 = now_us();
	for (i = 0; i < o.nconv; i++) {
		struct buf	js;

		memset(&js, 0, sizeof(js));
		buf_append(&js, "{\"participants\":[", 17);
		for (k = 1; k < o.users; k++) {
			user_name(name, sizeof(name), i, k);
			snprintf(line, sizeof(line), "%s\"%s\"",
			    k > 1 ? "," : "", name);
			buf_append(&js, line, strlen(line));
		}
		snprintf(line, sizeof(line), "],\"title\":\"loadgen %s%d\"}",
		    o.prefix, o.conv_offset + i);
		buf_append(&js, line, strlen(line));
		user_name(name, sizeof(name), i, 0);
		mint_token(tok, sizeof(tok), name);
		req.off = req.len = 0;
		snprintf(line, sizeof(line), "POST /api/conversations "
		    "HTTP/1.1\r\nHost: %s:%s\r\n", host, port);
		buf_append(&req, line, strlen(line));
		buf_append(&req, "Authorization: Bearer ", 22);
		buf_append(&req, tok, strlen(tok));
		snprintf(line, sizeof(line), "\r\nContent-Type: "
		    "application/json\r\nContent-Length: %zu\r\n\r\n",
		    buf_avail(&js));
		buf_append(&req, line, strlen(line));
		buf_append(&req, js.data, buf_avail(&js));
		buf_free(&js);
		for (tries = 0;; tries++) {
			status = http_request(fd, req.data, req.len, &body,
			    &keep);
			if (status != -1 && keep)
				break;
			close(fd);
			fd = http_connect(host, port);
			if (status != -1)
				break;
			if (tries == 3)
				fatal("POST /api/conversations: connection "
				    "failed");
		}
		if (status != 200 && status != 201)
			fatal("POST /api/conversations for %s%d: HTTP %d: "
			    "%.300s", o.prefix, o.conv_offset + i, status,
			    body.len ? body.data : "");
		if ((id = parse_conversation_id(body.data, body.len)) < 0)
			fatal("no conversation id in %.300s", body.data);
		convs[i].id = id;
		if (f != NULL)
			fprintf(f, "%" PRId64 "\n", id);
	}
	close(fd);
	buf_free(&req);
	buf_free(&body);
	if (f != NULL && fclose(f) != 0)
		fatal("%s: %s", o.conv_file, strerror(errno));
	note("created %d conversations of %d users in %.2f s", o.nconv,
	    o.users, (now_us() - t0) / 1e6);
}

/* WebSocket connections. */

static void
ep_update(struct conn *c, int out)
{
	struct epoll_event	ev;

	if (c->want_out == out)
		return;
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN | (out ? EPOLLOUT : 0);
	ev.data.ptr = c;
	if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) == -1)
		fatal("epoll_ctl: %s", strerror(errno));
	c->want_out = (uint8_t)out;
}

static void
q_remove(struct conn *c)
{
	if (c->queue == Q_LAUNCH)
		TAILQ_REMOVE(&launchq, c, q);
	else if (c->queue == Q_PENDING) {
		TAILQ_REMOVE(&pendq, c, q);
		st.inflight--;
	}
	c->queue = Q_NONE;
}

static void
q_launch(struct conn *c, uint64_t due)
{
	q_remove(c);
	c->t_due = due;
	c->queue = Q_LAUNCH;
	TAILQ_INSERT_TAIL(&launchq, c, q);
}

static int
first_connect_can_retry(struct conn *c)
{
	return (!c->ever_open && c->attempts <= (uint32_t)o.retries);
}

static void
conn_fail(struct conn *c, uint64_t *counter)
{
	(*counter)++;
	conn_close(c, 0);
}

/*
 * Close the socket.  Reasons to come back: it is the storm's (it will be
 * relaunched), a first connect with retries left, or --reconnect.
 */
static void
conn_close(struct conn *c, int dropping)
{
	uint64_t	now = now_us();

	if (c->fd != -1) {
		close(c->fd);
		c->fd = -1;
	}
	if (c->state == CS_OPEN)
		st.open--;
	q_remove(c);
	buf_free(&c->rbuf);
	buf_free(&c->wbuf);
	buf_free(&c->frag);
	c->want_out = 0;
	c->syncing = 0;
	if (dropping) {
		c->state = CS_IDLE;
		c->dropped = 1;
		return;
	}
	if (interrupted) {
		c->state = CS_DEAD;
		return;
	}
	if (!c->ever_open && first_connect_can_retry(c)) {
		c->state = CS_IDLE;
		q_launch(c, now + 1000000);
		return;
	}
	if (c->ever_open && (o.reconnect || c->dropped)) {
		c->state = CS_IDLE;
		q_launch(c, now + 1000000);
		return;
	}
	c->state = CS_DEAD;
}

static void
conn_start(struct conn *c)
{
	struct epoll_event	ev;
	int			one = 1;

	c->attempts++;
	c->t_start = now_us();
	c->fd = socket(dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK |
	    SOCK_CLOEXEC, 0);
	if (c->fd == -1) {
		if (errno == EMFILE || errno == ENFILE) {
			if (st.err_fdlimit++ == 0)
				note("socket: %s (at %d sockets): raise the "
				    "hard limit or split the run",
				    strerror(errno), st.open);
			q_remove(c);
			c->state = CS_DEAD;
			return;
		}
		conn_fail(c, &st.err_connect);
		return;
	}
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (!o.no_kernel_ts)
		setsockopt(c->fd, SOL_SOCKET, SO_TIMESTAMPNS, &one,
		    sizeof(one));
	if (nsrc > 0) {
		int	i = (int)(c->idx % (uint32_t)nsrc);

#ifdef IP_BIND_ADDRESS_NO_PORT
		setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one,
		    sizeof(one));
#endif
		if (bind(c->fd, (struct sockaddr *)&src[i], srclen[i]) == -1) {
			conn_fail(c, &st.err_addr);
			return;
		}
	}
	if (connect(c->fd, (struct sockaddr *)&dst, dstlen) == -1 &&
	    errno != EINPROGRESS) {
		if (errno == EADDRNOTAVAIL || errno == EADDRINUSE)
			conn_fail(c, &st.err_addr);
		else
			conn_fail(c, &st.err_connect);
		return;
	}
	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN | EPOLLOUT;
	ev.data.ptr = c;
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) == -1)
		fatal("epoll_ctl: %s", strerror(errno));
	c->want_out = 1;
	c->state = CS_CONNECTING;
	q_remove(c);
	c->queue = Q_PENDING;
	TAILQ_INSERT_TAIL(&pendq, c, q);
	st.inflight++;
}

/* The --chat-path with its %d (or %lld) replaced by the id. */
static void
chat_path(char *out, size_t sz, int64_t id)
{
	const char	*p = o.chat_path;
	size_t		 n = 0;
	int		 w;

	while (*p != '\0' && n + 1 < sz) {
		if (p[0] == '%' && p[1] == '%') {
			out[n++] = '%';
			p += 2;
		} else if (p[0] == '%' && (p[1] == 'd' ||
		    strncmp(p + 1, "lld", 3) == 0 ||
		    strncmp(p + 1, "ld", 2) == 0)) {
			w = snprintf(out + n, sz - n, "%" PRId64, id);
			n += (size_t)w;
			p += 1 + strspn(p + 1, "l") + 1;
		} else
			out[n++] = *p++;
	}
	if (n >= sz)
		fatal("chat path too long");
	out[n] = '\0';
}

static void
conn_send_upgrade(struct conn *c)
{
	unsigned char	 rnd[16];
	char		 req[4096], path[512], tok[1024], name[128];
	char		 query[1400];
	size_t		 n, qn = 0;

	if (RAND_bytes(rnd, sizeof(rnd)) != 1)
		fatal("RAND_bytes failed");
	b64(c->key, rnd, sizeof(rnd));
	user_name(name, sizeof(name), (int)c->conv,
	    (int)(c->slot / (uint32_t)o.sockets_per_user));
	mint_token(tok, sizeof(tok), name);
	chat_path(path, sizeof(path), convs[c->conv].id);
	query[0] = '\0';
	if (o.auth == AUTH_QUERY)
		qn += (size_t)snprintf(query + qn, sizeof(query) - qn,
		    "%ctoken=%s", strchr(path, '?') ? '&' : '?', tok);
	if (c->ever_open)
		snprintf(query + qn, sizeof(query) - qn, "%cafter=%" PRId64,
		    (strchr(path, '?') || qn) ? '&' : '?', c->last_id);
	n = (size_t)snprintf(req, sizeof(req),
	    "GET %s%s HTTP/1.1\r\n"
	    "Host: %s\r\n"
	    "Upgrade: websocket\r\n"
	    "Connection: Upgrade\r\n"
	    "Sec-WebSocket-Key: %s\r\n"
	    "Sec-WebSocket-Version: 13\r\n"
	    "%s%s%s"
	    "%s%s%s"
	    "\r\n", path, query, hostport, c->key,
	    o.auth == AUTH_SUBPROTOCOL ? "Sec-WebSocket-Protocol: parley, "
	    "bearer." : "", o.auth == AUTH_SUBPROTOCOL ? tok : "",
	    o.auth == AUTH_SUBPROTOCOL ? "\r\n" : "",
	    o.auth == AUTH_HEADER ? "Authorization: Bearer " : "",
	    o.auth == AUTH_HEADER ? tok : "",
	    o.auth == AUTH_HEADER ? "\r\n" : "");
	if (n >= sizeof(req))
		fatal("upgrade request too long");
	c->state = CS_HANDSHAKE;
	conn_write(c, req, n);
}

static void
conn_flush(struct conn *c)
{
	ssize_t	w;

	while (buf_avail(&c->wbuf) > 0) {
		w = send(c->fd, c->wbuf.data + c->wbuf.off, buf_avail(&c->wbuf),
		    MSG_NOSIGNAL);
		if (w == -1) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			conn_fail(c, &st.err_io);
			return;
		}
		buf_consume(&c->wbuf, (size_t)w);
	}
	ep_update(c, buf_avail(&c->wbuf) > 0);
}

static void
conn_write(struct conn *c, const void *p, size_t n)
{
	ssize_t	w = 0;

	if (c->fd == -1)
		return;
	if (buf_avail(&c->wbuf) == 0 && c->state != CS_CONNECTING) {
		w = send(c->fd, p, n, MSG_NOSIGNAL);
		if (w == -1) {
			if (errno != EAGAIN && errno != EINTR) {
				conn_fail(c, &st.err_io);
				return;
			}
			w = 0;
		}
		if ((size_t)w == n)
			return;
	}
	buf_append(&c->wbuf, (const char *)p + w, n - (size_t)w);
	if (buf_avail(&c->wbuf) > st.max_wbuf)
		st.max_wbuf = buf_avail(&c->wbuf);
	if (c->state != CS_CONNECTING)
		ep_update(c, 1);
}

/* Write one masked client frame. */
static void
ws_send(struct conn *c, int opcode, const void *payload, size_t n)
{
	unsigned char	*f = (unsigned char *)scratch;
	uint64_t	 m;
	unsigned char	 mask[4];
	size_t		 h = 0, i;

	if (n + 14 > sizeof(scratch))
		fatal("frame too large");
	f[h++] = (unsigned char)(0x80 | opcode);
	if (n < 126)
		f[h++] = (unsigned char)(0x80 | n);
	else if (n < 65536) {
		f[h++] = 0x80 | 126;
		f[h++] = (unsigned char)(n >> 8);
		f[h++] = (unsigned char)n;
	} else {
		f[h++] = 0x80 | 127;
		for (i = 0; i < 8; i++)
			f[h++] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
	}
	m = rng();
	memcpy(mask, &m, 4);
	memcpy(f + h, mask, 4);
	h += 4;
	for (i = 0; i < n; i++)
		f[h + i] = ((const unsigned char *)payload)[i] ^ mask[i & 3];
	conn_write(c, f, h + n);
}

static void
ws_send_text(struct conn *c, const char *s, size_t n)
{
	ws_send(c, 0x1, s, n);
}

static void
became_open(struct conn *c)
{
	q_remove(c);
	c->state = CS_OPEN;
	st.open++;
	hist_add(&st.conn_lat, t_recv - c->t_start);
	if (c->ever_open)
		st.reconnected++;
	else
		st.connected++;
	c->ever_open = 1;
	if (c->dropped && storm.state == 3 &&
	    ++storm.reopened == storm.dropped)
		storm.t_all_open = t_recv;
}

static void
storm_caught_up(struct conn *c)
{
	c->syncing = 0;
	if (!c->dropped)
		return;
	c->dropped = 0;
	hist_add(&st.catchup, t_recv - storm.t_reconnect);
	if (++storm.caught == storm.dropped)
		storm.t_all_caught = t_recv;
}

static void
on_message(struct conn *c, const char *s, const char *e, int replay)
{
	static const char	*keys[] = { "id", "conversation_id",
				    "message_text", "content", "message" };
	struct jspan		 v[5];
	struct conv		*cv;
	struct msg		*m;
	const char		*t, *te;
	size_t			 tn;
	int64_t			 id = 0, cid;
	uint64_t		 x[5], lat;
	unsigned long		 rid;
	uint8_t			*bits;
	int			 i, have_id, ooo = 0;

	if (*s == '{') {
		json_get(s, e, keys, 5, v);
		have_id = span_int(&v[0], &id) == 0;
		if (span_int(&v[1], &cid) == 0 && cid != convs[c->conv].id) {
			st.misrouted++;
			return;
		}
		if (span_str(&v[2], &t, &tn) == -1 &&
		    span_str(&v[3], &t, &tn) == -1 &&
		    span_str(&v[4], &t, &tn) == -1) {
			st.foreign++;
			return;
		}
	} else {
		/* A server that sends the text itself as "message". */
		struct jspan	sp = { s, e };

		have_id = 0;
		if (span_str(&sp, &t, &tn) == -1) {
			st.foreign++;
			return;
		}
	}
	if (have_id) {
		ooo = id <= c->last_id;
		if (!ooo)
			c->last_id = id;
	}
	/* "lg <runid> <conv> <slot> <seq> <t_send>" */
	te = t + tn;
	if (tn < 4 || memcmp(t, "lg ", 3) != 0) {
		st.foreign++;
		return;
	}
	t += 3;
	rid = strtoul(t, (char **)&t, 16);
	if (rid != runid) {
		st.foreign++;
		return;
	}
	for (i = 0; i < 4; i++) {
		if (t >= te || *t != ' ')
			break;
		x[i] = strtoull(t + 1, (char **)&t, 10);
	}
	if (i != 4 || x[0] != c->conv) {
		st.misrouted++;
		return;
	}
	cv = &convs[c->conv];
	if (x[2] >= cv->nmsg || x[1] >= (uint64_t)nslots) {
		st.foreign++;
		return;
	}
	m = &cv->msgs[x[2]];
	if (have_id) {
		if (m->server_id == 0)
			m->server_id = id;
		else if (m->server_id != id)
			st.id_mismatch++;
	}
	bits = cv->bits + (size_t)x[2] * bpm;
	if (bits[c->slot >> 3] & (1 << (c->slot & 7))) {
		st.duplicates++;
		return;
	}
	bits[c->slot >> 3] |= (uint8_t)(1 << (c->slot & 7));
	if (m->t_first == 0)
		m->t_first = t_recv;
	if (ooo)
		st.out_of_order++;
	lat = t_recv > m->t_send ? t_recv - m->t_send : 0;
	if (c->slot == m->sender) {
		st.echoes++;
		if (!replay)
			hist_add(&st.echo, lat);
		return;
	}
	m->ndeliv++;
	st.delivered++;
	if (replay)
		st.replayed++;
	else {
		st.delivered_live++;
		hist_add(&st.lat, lat);
		hist_add(&st.lat_iv, lat);
	}
}

static void
on_text(struct conn *c, const char *p, size_t n)
{
	static const char	*keys[] = { "type", "message", "replay",
				    "last_message_id", "has_more", "code" };
	struct jspan		 v[6];
	const char		*e = p + n, *cs;
	size_t			 cn;
	char			 req[128];
	int64_t			 last;

	st.frames_in++;
	if (json_get(p, e, keys, 6, v) < 1 || v[0].s == NULL) {
		st.err_proto++;
		return;
	}
	if (span_is(&v[0], "\"message\"") && v[1].s != NULL) {
		on_message(c, v[1].s, v[1].e, span_is(&v[2], "true"));
		return;
	}
	if (span_is(&v[0], "\"ready\"")) {
		if (c->state == CS_WAITREADY) {
			if (!c->ever_open && span_int(&v[3], &last) == 0)
				c->last_id = last;
			became_open(c);
		}
		return;
	}
	if (span_is(&v[0], "\"ack\"")) {
		st.acks++;
		return;
	}
	if (span_is(&v[0], "\"pong\"")) {
		st.pongs++;
		return;
	}
	if (span_is(&v[0], "\"synced\"")) {
		if (span_is(&v[4], "true")) {
			if (span_int(&v[3], &last) == -1)
				last = c->last_id;
			snprintf(req, sizeof(req), "{\"type\":\"sync\","
			    "\"after\":%" PRId64 ",\"limit\":500}", last);
			ws_send_text(c, req, strlen(req));
			return;
		}
		if (c->syncing)
			storm_caught_up(c);
		return;
	}
	if (span_is(&v[0], "\"error\"")) {
		st.server_errors++;
		if (span_str(&v[5], &cs, &cn) == 0)
			code_count(st.errcodes, &st.nerrcodes, 0, cs, cn);
		return;
	}
	if (v[0].s != NULL && *v[0].s == '"' && v[0].e - v[0].s > 2 &&
	    isupper((unsigned char)v[0].s[1]) && v[1].s != NULL) {
		/* {"message":"..","type":"TEXT"} echoed back as is. */
		on_message(c, v[1].s, v[1].e, 0);
		return;
	}
	st.other_events++;
}

/* Parse the 101 response.  Returns bytes used, 0 for more, -1 failed. */
static ssize_t
conn_handshake(struct conn *c, const char *p, size_t n)
{
	unsigned char	 sha[SHA_DIGEST_LENGTH];
	char		 hdr[MAX_HEADER + 1], want[64], cat[128];
	const char	*end;
	char		*a;
	size_t		 hlen;
	int		 status;

	if ((end = memmem(p, n, "\r\n\r\n", 4)) == NULL) {
		if (n > MAX_HEADER) {
			conn_fail(c, &st.err_http);
			return (-1);
		}
		return (0);
	}
	hlen = (size_t)(end - p) + 4;
	if (hlen > MAX_HEADER) {
		conn_fail(c, &st.err_http);
		return (-1);
	}
	memcpy(hdr, p, hlen);
	hdr[hlen] = '\0';
	if (sscanf(hdr, "HTTP/1.%*d %d", &status) != 1 || status != 101) {
		char	name[16];

		snprintf(name, sizeof(name), "http_%d", status);
		code_count(st.closecodes, &st.nclosecodes, status, name,
		    strlen(name));
		conn_fail(c, &st.err_http);
		return (-1);
	}
	snprintf(cat, sizeof(cat), "%s%s", c->key, WS_GUID);
	SHA1((unsigned char *)cat, strlen(cat), sha);
	b64(want, sha, sizeof(sha));
	if ((a = strcasestr(hdr, "\r\nsec-websocket-accept:")) == NULL ||
	    strncmp(a + 23 + strspn(a + 23, " "), want, strlen(want)) != 0) {
		conn_fail(c, &st.err_accept);
		return (-1);
	}
	if (o.no_ready) {
		c->state = CS_WAITREADY;
		t_recv = now_us();
		became_open(c);
	} else
		c->state = CS_WAITREADY;
	if (c->ever_open && c->dropped)
		c->syncing = 1;
	return ((ssize_t)hlen);
}

static void
on_close_frame(struct conn *c, const unsigned char *p, size_t n)
{
	unsigned char	reply[2];
	int		code = 1005;

	if (n >= 2)
		code = (p[0] << 8) | p[1];
	code_count(st.closecodes, &st.nclosecodes, code,
	    n > 2 ? (const char *)p + 2 : "", n > 2 ? n - 2 : 0);
	st.closes++;
	reply[0] = (unsigned char)(code >> 8);
	reply[1] = (unsigned char)code;
	ws_send(c, 0x8, reply, n >= 2 ? 2 : 0);
	conn_close(c, 0);
}

/* Consume whole frames from p; returns bytes used. */
static size_t
conn_input(struct conn *c, const char *p, size_t n)
{
	const unsigned char	*u;
	size_t			 used = 0, h, plen, i;
	ssize_t			 r;
	unsigned char		 mask[4];
	int			 fin, op, masked;

	if (c->state == CS_HANDSHAKE) {
		if ((r = conn_handshake(c, p, n)) <= 0)
			return (0);
		used = (size_t)r;
	}
	while (c->fd != -1 && n - used >= 2) {
		u = (const unsigned char *)p + used;
		fin = u[0] & 0x80;
		op = u[0] & 0x0f;
		masked = u[1] & 0x80;
		plen = u[1] & 0x7f;
		h = 2;
		if (plen == 126) {
			if (n - used < 4)
				break;
			plen = ((size_t)u[2] << 8) | u[3];
			h = 4;
		} else if (plen == 127) {
			if (n - used < 10)
				break;
			plen = 0;
			for (i = 0; i < 8; i++)
				plen = (plen << 8) | u[2 + i];
			h = 10;
		}
		if (masked)
			h += 4;
		if (plen > MAX_FRAME) {
			conn_fail(c, &st.err_proto);
			return (0);
		}
		if (n - used < h + plen)
			break;
		if (masked) {
			/* Servers must not mask; unmask in place anyway. */
			memcpy(mask, u + h - 4, 4);
			for (i = 0; i < plen; i++)
				((unsigned char *)u)[h + i] ^= mask[i & 3];
		}
		st.bytes_in += h + plen;
		switch (op) {
		case 0x0:
			buf_append(&c->frag, u + h, plen);
			if (fin) {
				if (c->fragop == 0x1)
					on_text(c, c->frag.data + c->frag.off,
					    buf_avail(&c->frag));
				buf_free(&c->frag);
			}
			break;
		case 0x1:
		case 0x2:
			if (fin) {
				if (op == 0x1)
					on_text(c, (const char *)u + h, plen);
			} else {
				buf_free(&c->frag);
				c->fragop = (uint8_t)op;
				buf_append(&c->frag, u + h, plen);
			}
			break;
		case 0x8:
			on_close_frame(c, u + h, plen);
			return (0);
		case 0x9:
			ws_send(c, 0xa, u + h, plen);
			break;
		case 0xa:
			break;
		default:
			conn_fail(c, &st.err_proto);
			return (0);
		}
		used += h + plen;
	}
	return (used);
}

/*
 * The time the data reached the socket: the kernel's receive time stamp
 * when there is one (so the generator's own scheduling delays stay out of
 * the latencies), else the time of the read.
 */
static uint64_t
recv_time(struct msghdr *mh)
{
	struct cmsghdr	*cm;
	struct timespec	 ts;
	uint64_t	 now = now_us(), t;

	for (cm = CMSG_FIRSTHDR(mh); cm != NULL; cm = CMSG_NXTHDR(mh, cm)) {
		if (cm->cmsg_level != SOL_SOCKET ||
		    cm->cmsg_type != SCM_TIMESTAMPNS)
			continue;
		memcpy(&ts, CMSG_DATA(cm), sizeof(ts));
		t = (uint64_t)((int64_t)ts.tv_sec * 1000000 +
		    ts.tv_nsec / 1000 - rt_offset);
		if (ts.tv_sec != 0 && t <= now && now - t < 60000000)
			return (t);
	}
	return (now);
}

static void
conn_read(struct conn *c)
{
	struct msghdr	 mh;
	struct iovec	 iov;
	union {
		char		buf[CMSG_SPACE(sizeof(struct timespec))];
		struct cmsghdr	align;
	}		 cbuf;
	ssize_t		 n;
	size_t		 used;

	for (;;) {
		memset(&mh, 0, sizeof(mh));
		iov.iov_base = iobuf;
		iov.iov_len = sizeof(iobuf);
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cbuf.buf;
		mh.msg_controllen = sizeof(cbuf.buf);
		n = recvmsg(c->fd, &mh, 0);
		if (n == -1) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return;
			conn_fail(c, &st.err_io);
			return;
		}
		if (n == 0) {
			conn_fail(c, c->state == CS_HANDSHAKE ||
			    c->state == CS_CONNECTING ? &st.err_http :
			    &st.err_eof);
			return;
		}
		t_recv = recv_time(&mh);
		if (buf_avail(&c->rbuf) > 0) {
			buf_append(&c->rbuf, iobuf, (size_t)n);
			used = conn_input(c, c->rbuf.data + c->rbuf.off,
			    buf_avail(&c->rbuf));
			if (c->fd == -1)
				return;
			buf_consume(&c->rbuf, used);
		} else {
			used = conn_input(c, iobuf, (size_t)n);
			if (c->fd == -1)
				return;
			if (used < (size_t)n)
				buf_append(&c->rbuf, iobuf + used,
				    (size_t)n - used);
		}
		if ((size_t)n < sizeof(iobuf))
			return;
	}
}

static void
conn_event(struct conn *c, uint32_t ev)
{
	socklen_t	len;
	int		err = 0;

	if (c->fd == -1)
		return;
	if (c->state == CS_CONNECTING) {
		if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
			return;
		len = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err != 0) {
			conn_fail(c, err == EADDRNOTAVAIL ? &st.err_addr :
			    &st.err_connect);
			return;
		}
		c->state = CS_HANDSHAKE;
		conn_flush(c);
		if (c->fd == -1)
			return;
		conn_send_upgrade(c);
		return;
	}
	if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
		conn_read(c);
		if (c->fd == -1)
			return;
	}
	if ((ev & EPOLLOUT) && buf_avail(&c->wbuf) > 0)
		conn_flush(c);
}

/* Traffic. */

static void
send_one(uint64_t n, uint64_t sched, uint64_t now)
{
	struct conv	*cv;
	struct conn	*c;
	struct msg	*m;
	char		 text[8192], frame[8400];
	int		 s, conv, user, tn, fn;
	uint32_t	 slot;

	s = (int)(n % (uint64_t)nsenders);
	conv = s % o.nconv;
	user = s / o.nconv;
	slot = (uint32_t)(user * o.sockets_per_user);
	c = &conns[conv * nslots + (int)slot];
	if (c->state != CS_OPEN) {
		st.skipped++;
		if (storm.state == 2)
			storm.sent_while_down++;
		return;
	}
	cv = &convs[conv];
	if (cv->nmsg == cv->capmsg) {
		cv->capmsg = cv->capmsg ? cv->capmsg * 2 : 1024;
		cv->msgs = xrealloc(cv->msgs, cv->capmsg * sizeof(*cv->msgs));
		cv->bits = xrealloc(cv->bits, cv->capmsg * bpm);
	}
	m = &cv->msgs[cv->nmsg];
	memset(cv->bits + (size_t)cv->nmsg * bpm, 0, bpm);
	m->t_send = now;
	m->t_first = 0;
	m->server_id = 0;
	m->sender = slot;
	m->ndeliv = 0;
	tn = snprintf(text, sizeof(text), "lg %08x %d %u %u %" PRIu64,
	    runid, conv, slot, cv->nmsg, now);
	while (tn < o.msg_size && tn < (int)sizeof(text) - 1)
		text[tn++] = 'x';
	text[tn] = '\0';
	if (o.canonical)
		fn = snprintf(frame, sizeof(frame), "{\"type\":\"message\","
		    "\"content\":\"%s\",\"message_type\":\"TEXT\"}", text);
	else
		fn = snprintf(frame, sizeof(frame), "{\"message\":\"%s\","
		    "\"type\":\"TEXT\"}", text);
	cv->nmsg++;
	st.sent++;
	st.sent_bytes += (uint64_t)fn;
	st.expected += (uint64_t)(nslots - 1);
	hist_add(&st.lag, now - sched);
	ws_send_text(c, frame, (size_t)fn);
}

static void
ping_one(struct conn *c)
{
	static const char	ping[] = "{\"type\":\"ping\"}";

	if (c->state != CS_OPEN)
		return;
	st.pings++;
	ws_send_text(c, ping, sizeof(ping) - 1);
}

static void
storm_drop(uint64_t now)
{
	int	slot, cv, left = o.storm;

	/* The highest slots of every conversation first: senders stay. */
	for (slot = nslots - 1; slot >= 0 && left > 0; slot--) {
		for (cv = 0; cv < o.nconv && left > 0; cv++) {
			struct conn	*c = &conns[cv * nslots + slot];

			if (c->state != CS_OPEN)
				continue;
			conn_close(c, 1);
			storm.dropped++;
			left--;
		}
	}
	storm.t_drop = now;
	storm.state = 2;
	note("storm: dropped %d sockets", storm.dropped);
}

static void
storm_reconnect(uint64_t now)
{
	int	i;

	for (i = 0; i < nconns; i++) {
		if (conns[i].dropped && conns[i].state == CS_IDLE)
			q_launch(&conns[i], now);
	}
	storm.t_reconnect = now;
	storm.state = 3;
	note("storm: reconnecting %d sockets", storm.dropped);
}

static void
on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

/* Results. */

/* Text fit to go between JSON quotes: quotes, backslashes, controls dropped. */
static const char *
json_safe(const char *in, char *out, size_t sz)
{
	size_t	n = 0;

	for (; *in != '\0' && n + 1 < sz; in++) {
		if (*in == '"' || *in == '\\' || (unsigned char)*in < 0x20)
			continue;
		out[n++] = *in;
	}
	out[n] = '\0';
	return (out);
}

static void
print_codes(FILE *f, const char *name, const struct codecount *t, int n)
{
	int	i;

	fprintf(f, ",\"%s\":{", name);
	for (i = 0; i < n; i++) {
		if (t[i].code != 0)
			fprintf(f, "%s\"%d%s%s\":%" PRIu64, i ? "," : "",
			    t[i].code, t[i].name[0] ? " " : "", t[i].name,
			    t[i].count);
		else
			fprintf(f, "%s\"%s\":%" PRIu64, i ? "," : "",
			    t[i].name, t[i].count);
	}
	fprintf(f, "}");
}

static void
report(uint64_t t_begin, uint64_t t0, uint64_t t_send_end, uint64_t t_end,
    uint64_t cpu0, uint64_t cpu_traffic0, uint64_t cpu_traffic1)
{
	uint64_t	 lost = 0, lost_open = 0, lost_msgs = 0, user, sys;
	uint64_t	 unseen_msgs = 0, unseen_deliv = 0, inflight_deliv = 0;
	double		 tw, dw;
	char		 label[256], url[256];
	int		 i, k, open_end = 0, shown = 0;
	uint32_t	 j;
	FILE		*f = stdout;

	for (i = 0; i < nconns; i++)
		if (conns[i].state == CS_OPEN)
			open_end++;
	for (i = 0; i < o.nconv; i++) {
		struct conv	*cv = &convs[i];

		for (j = 0; j < cv->nmsg; j++) {
			struct msg	*m = &cv->msgs[j];
			uint8_t		*bits;
			uint64_t	 miss;

			bits = cv->bits + (size_t)j * bpm;
			miss = (uint64_t)(nslots - 1) - m->ndeliv;
			if (miss == 0)
				continue;
			lost += miss;
			lost_msgs++;
			/* No socket, not even the sender's, ever saw it. */
			if (m->ndeliv == 0 && m->server_id == 0 &&
			    !(bits[m->sender >> 3] & (1 << (m->sender & 7)))) {
				unseen_msgs++;
				unseen_deliv += miss;
			} else if (t_end - m->t_first < 1000000) {
				/* Being broadcast when the run ended. */
				inflight_deliv += miss;
			}
			for (k = 0; k < nslots; k++) {
				if ((uint32_t)k == m->sender ||
				    (bits[k >> 3] & (1 << (k & 7))))
					continue;
				if (conns[i * nslots + k].state == CS_OPEN)
					lost_open++;
				if (shown < o.show_lost) {
					shown++;
					note("lost: conversation %" PRId64
					    " message %u (server id %" PRId64
					    ", sent at +%.3f s by slot %u) to "
					    "slot %d (%s, last id %" PRId64 ")",
					    cv->id, j, m->server_id,
					    ((int64_t)m->t_send - (int64_t)t0) /
					    1e6, m->sender, k,
					    conns[i * nslots + k].dropped ?
					    "dropped" : "kept",
					    conns[i * nslots + k].last_id);
				}
			}
		}
	}
	cpu_split(&user, &sys);
	tw = (t_send_end - t0) / 1e6;
	dw = (t_end - t0) / 1e6;
	fprintf(f, "{\"tool\":\"loadgen\",\"label\":\"%s\",\"mode\":\"%s\","
	    "\"url\":\"%s\",\"conversations\":%d,\"users_per_conversation\":%d,"
	    "\"sockets_per_user\":%d,\"sockets\":%d,\"senders\":%d,"
	    "\"source_ips\":%d,\"auth\":\"%s\",\"send_form\":\"%s\","
	    "\"offered_rate\":%.1f,\"duration_s\":%.3f,\"drain_s\":%.3f,"
	    "\"connect_phase_s\":%.3f,",
	    json_safe(o.label ? o.label : "", label, sizeof(label)),
	    o.idle ? "idle" : "traffic", json_safe(o.url, url, sizeof(url)),
	    o.nconv, o.users, o.sockets_per_user, nconns, nsenders, nsrc,
	    o.auth == AUTH_QUERY ? "query" : o.auth == AUTH_SUBPROTOCOL ?
	    "subprotocol" : "header", o.canonical ? "canonical" : "compat",
	    o.rate, tw, (t_end - t_send_end) / 1e6, (t0 - t_begin) / 1e6);
	fprintf(f, "\"connected\":%" PRIu64 ",\"open_at_end\":%d,"
	    "\"reconnected\":%" PRIu64 ",\"errors\":{\"connect\":%" PRIu64
	    ",\"address\":%" PRIu64 ",\"fd_limit\":%" PRIu64
	    ",\"timeout\":%" PRIu64 ",\"http\":%"
	    PRIu64 ",\"accept\":%" PRIu64 ",\"eof\":%" PRIu64 ",\"io\":%"
	    PRIu64 ",\"protocol\":%" PRIu64 ",\"closed_by_server\":%" PRIu64
	    "}", st.connected, open_end, st.reconnected, st.err_connect,
	    st.err_addr, st.err_fdlimit, st.err_timeout, st.err_http,
	    st.err_accept,
	    st.err_eof, st.err_io, st.err_proto, st.closes);
	print_codes(f, "close_codes", st.closecodes, st.nclosecodes);
	print_codes(f, "server_error_codes", st.errcodes, st.nerrcodes);
	fprintf(f, ",\"sent\":%" PRIu64 ",\"skipped\":%" PRIu64
	    ",\"acks\":%" PRIu64 ",\"expected_deliveries\":%" PRIu64
	    ",\"delivered\":%" PRIu64 ",\"delivered_live\":%" PRIu64
	    ",\"replayed\":%" PRIu64 ",\"echoes\":%" PRIu64
	    ",\"echoes_missing\":%" PRIu64
	    ",\"duplicates\":%" PRIu64 ",\"lost\":%" PRIu64
	    ",\"lost_to_open_sockets\":%" PRIu64 ",\"lost_messages\":%" PRIu64
	    ",\"lost_messages_seen_by_none\":%" PRIu64
	    ",\"lost_in_flight_at_end\":%" PRIu64
	    ",\"lost_of_messages_seen\":%" PRIu64
	    ",\"out_of_order\":%" PRIu64 ",\"id_mismatch\":%" PRIu64
	    ",\"misrouted\":%" PRIu64 ",\"foreign\":%" PRIu64
	    ",\"server_errors\":%" PRIu64 ",\"other_events\":%" PRIu64
	    ",\"pings\":%" PRIu64 ",\"pongs\":%" PRIu64
	    ",\"frames_in\":%" PRIu64 ",\"bytes_in\":%" PRIu64
	    ",\"max_pending_out_bytes\":%" PRIu64 ",",
	    st.sent, st.skipped, st.acks, st.expected, st.delivered,
	    st.delivered_live, st.replayed, st.echoes,
	    st.sent > st.echoes ? st.sent - st.echoes : 0, st.duplicates, lost,
	    lost_open, lost_msgs, unseen_msgs, inflight_deliv,
	    lost - unseen_deliv - inflight_deliv,
	    st.out_of_order, st.id_mismatch,
	    st.misrouted, st.foreign, st.server_errors, st.other_events,
	    st.pings, st.pongs, st.frames_in, st.bytes_in, st.max_wbuf);
	fprintf(f, "\"send_rate\":%.1f,\"delivery_rate\":%.1f,",
	    tw > 0 ? st.sent / tw : 0.0, dw > 0 ? st.delivered / dw : 0.0);
	hist_json(f, "latency_ms", &st.lat);
	fputc(',', f);
	hist_json(f, "echo_latency_ms", &st.echo);
	fputc(',', f);
	hist_json(f, "send_lag_ms", &st.lag);
	fputc(',', f);
	hist_json(f, "connect_ms", &st.conn_lat);
	if (o.storm > 0) {
		fprintf(f, ",\"storm\":{\"dropped\":%d,\"caught_up\":%d,"
		    "\"down_s\":%.3f,\"all_open_s\":%.3f,"
		    "\"all_caught_up_s\":%.3f,\"sends_skipped_while_down\":%"
		    PRIu64 ",", storm.dropped, storm.caught,
		    storm.t_reconnect ? (storm.t_reconnect - storm.t_drop) /
		    1e6 : 0.0, storm.t_all_open ? (storm.t_all_open -
		    storm.t_reconnect) / 1e6 : -1.0, storm.t_all_caught ?
		    (storm.t_all_caught - storm.t_reconnect) / 1e6 : -1.0,
		    storm.sent_while_down);
		hist_json(f, "catchup_ms", &st.catchup);
		fputc('}', f);
	}
	fprintf(f, ",\"loadgen_cpu\":{\"user_s\":%.3f,\"sys_s\":%.3f,"
	    "\"total_s\":%.3f,\"traffic_s\":%.3f,\"traffic_pct_of_core\":%.1f,"
	    "\"us_per_delivery\":%.2f,\"max_rss_kb\":%ld}}\n",
	    user / 1e6, sys / 1e6, (user + sys - cpu0) / 1e6,
	    (cpu_traffic1 - cpu_traffic0) / 1e6,
	    t_end > t0 ? 100.0 * (cpu_traffic1 - cpu_traffic0) /
	    (double)(t_end - t0) : 0.0,
	    st.delivered + st.echoes ? (double)(cpu_traffic1 - cpu_traffic0) /
	    (double)(st.delivered + st.echoes) : 0.0, maxrss_kb());
	fflush(f);
}

static void
progress_line(uint64_t now, uint64_t t0, uint64_t *last_cpu,
    uint64_t *last_t)
{
	uint64_t	cpu = cpu_us();

	fprintf(stderr, "loadgen: t=%5.1fs open=%d inflight=%d sent=%" PRIu64
	    " delivered=%" PRIu64 " dup=%" PRIu64 " p50=%.2fms p99=%.2fms "
	    "max=%.2fms errors=%" PRIu64 " cpu=%.0f%%\n",
	    now > t0 ? (now - t0) / 1e6 : 0.0, st.open, st.inflight, st.sent,
	    st.delivered, st.duplicates, hist_pct(&st.lat_iv, 0.5) / 1000.0,
	    hist_pct(&st.lat_iv, 0.99) / 1000.0, st.lat_iv.max / 1000.0,
	    st.err_connect + st.err_addr + st.err_fdlimit + st.err_timeout +
	    st.err_http +
	    st.err_accept + st.err_eof + st.err_io + st.err_proto + st.closes,
	    now > *last_t ? 100.0 * (cpu - *last_cpu) /
	    (double)(now - *last_t) : 0.0);
	memset(&st.lat_iv, 0, sizeof(st.lat_iv));
	*last_cpu = cpu;
	*last_t = now;
}

/* The event loop. */

static int
wait_events(uint64_t timeout_us)
{
	struct epoll_event	 evs[MAX_EVENTS];
	struct timespec		 ts;
	int			 n, i;
	static int		 no_pwait2;

	if (timeout_us > 1000000)
		timeout_us = 1000000;
	if (!no_pwait2) {
		ts.tv_sec = (time_t)(timeout_us / 1000000);
		ts.tv_nsec = (long)(timeout_us % 1000000) * 1000;
		n = epoll_pwait2(epfd, evs, MAX_EVENTS, &ts, NULL);
		if (n == -1 && errno == ENOSYS) {
			no_pwait2 = 1;
			return (0);
		}
	} else
		n = epoll_wait(epfd, evs, MAX_EVENTS,
		    (int)((timeout_us + 999) / 1000));
	if (n == -1) {
		if (errno == EINTR)
			return (0);
		fatal("epoll_wait: %s", strerror(errno));
	}
	for (i = 0; i < n; i++)
		conn_event(evs[i].data.ptr, evs[i].events);
	return (n);
}

/* Start what may start; expire what took too long. */
static uint64_t
launch_and_expire(uint64_t now, int window)
{
	struct conn	*c;
	uint64_t	 tmo = (uint64_t)(o.connect_timeout * 1e6);
	uint64_t	 next = UINT64_MAX;

	while ((c = TAILQ_FIRST(&pendq)) != NULL &&
	    now - c->t_start >= tmo)
		conn_fail(c, &st.err_timeout);
	if (c != NULL)
		next = c->t_start + tmo;
	while ((c = TAILQ_FIRST(&launchq)) != NULL &&
	    (window == 0 || st.inflight < window)) {
		/* Due times only grow along the queue. */
		if (c->t_due > now) {
			if (c->t_due < next)
				next = c->t_due;
			break;
		}
		conn_start(c);
	}
	return (next);
}

int
main(int argc, char *argv[])
{
	static struct option	 longopts[] = {
		{ "url", required_argument, NULL, 'u' },
		{ "api-url", required_argument, NULL, 'A' },
		{ "chat-path", required_argument, NULL, 'p' },
		{ "secret", required_argument, NULL, 's' },
		{ "conversations", required_argument, NULL, 'c' },
		{ "users-per-conversation", required_argument, NULL, 'k' },
		{ "sockets-per-user", required_argument, NULL, 'S' },
		{ "senders", required_argument, NULL, 'M' },
		{ "user-prefix", required_argument, NULL, 'P' },
		{ "conv-file", required_argument, NULL, 'f' },
		{ "conv-ids", required_argument, NULL, 'i' },
		{ "create", no_argument, NULL, 'C' },
		{ "create-only", no_argument, NULL, 'O' },
		{ "rate", required_argument, NULL, 'r' },
		{ "duration", required_argument, NULL, 'd' },
		{ "grace", required_argument, NULL, 'g' },
		{ "msg-size", required_argument, NULL, 'z' },
		{ "canonical", no_argument, NULL, 'K' },
		{ "auth", required_argument, NULL, 'a' },
		{ "source-ips", required_argument, NULL, 'I' },
		{ "concurrency", required_argument, NULL, 'n' },
		{ "connect-timeout", required_argument, NULL, 't' },
		{ "retries", required_argument, NULL, 'R' },
		{ "no-ready", no_argument, NULL, 'N' },
		{ "idle", no_argument, NULL, 'D' },
		{ "ping-interval", required_argument, NULL, 'G' },
		{ "reconnect", no_argument, NULL, 'X' },
		{ "storm", required_argument, NULL, 'x' },
		{ "storm-at", required_argument, NULL, 'y' },
		{ "storm-down", required_argument, NULL, 'w' },
		{ "storm-concurrency", required_argument, NULL, 'W' },
		{ "token-ttl", required_argument, NULL, 'T' },
		{ "label", required_argument, NULL, 'L' },
		{ "progress", no_argument, NULL, 'v' },
		{ "mint", required_argument, NULL, 'm' },
		{ "show-lost", required_argument, NULL, 'l' },
		{ "conv-offset", required_argument, NULL, 'o' },
		{ "no-kernel-timestamps", no_argument, NULL, 'Z' },
		{ "coalesce-us", required_argument, NULL, 'Q' },
		{ NULL, 0, NULL, 0 }
	};
	char		 host[256], port[32];
	uint64_t	 t_begin, t0 = 0, t_send_end = 0, t_end = 0, now, next;
	uint64_t	 nsched = 0, interval_ns, cpu0, cpu_t0 = 0, cpu_t1 = 0;
	uint64_t	 last_prog = 0, last_cpu = 0, t_grace_end = 0;
	uint64_t	 pinged = 0, t_ping0 = 0, tt;
	uint64_t	 last_sync = 0;
	int		 ch, i, phase = 0, nev = 0;

	o.chat_path = "/ws/chat/%d/";
	o.prefix = "b";
	o.nconv = 1;
	o.users = 2;
	o.sockets_per_user = 1;
	o.duration = 10;
	o.grace = 5;
	o.ping_interval = 30;
	o.connect_timeout = 15;
	o.concurrency = 256;
	o.token_ttl = 86400;
	o.storm_at = -1;
	o.storm_down = 1;
	o.coalesce_us = 500;

	while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (ch) {
		case 'u': o.url = optarg; break;
		case 'A': o.api_url = optarg; break;
		case 'p': o.chat_path = optarg; break;
		case 's': o.secret = optarg; break;
		case 'c': o.nconv = atoi(optarg); break;
		case 'k': o.users = atoi(optarg); break;
		case 'S': o.sockets_per_user = atoi(optarg); break;
		case 'M': o.senders = atoi(optarg); break;
		case 'P': o.prefix = optarg; break;
		case 'f': o.conv_file = optarg; break;
		case 'i': o.conv_ids = optarg; break;
		case 'C': o.create = 1; break;
		case 'O': o.create = o.create_only = 1; break;
		case 'r': o.rate = atof(optarg); break;
		case 'd': o.duration = atof(optarg); break;
		case 'g': o.grace = atof(optarg); break;
		case 'z': o.msg_size = atoi(optarg); break;
		case 'K': o.canonical = 1; break;
		case 'a':
			if (strcmp(optarg, "query") == 0)
				o.auth = AUTH_QUERY;
			else if (strcmp(optarg, "subprotocol") == 0)
				o.auth = AUTH_SUBPROTOCOL;
			else if (strcmp(optarg, "header") == 0)
				o.auth = AUTH_HEADER;
			else
				usage();
			break;
		case 'I': o.source_ips = optarg; break;
		case 'n': o.concurrency = atoi(optarg); break;
		case 't': o.connect_timeout = atof(optarg); break;
		case 'R': o.retries = atoi(optarg); break;
		case 'N': o.no_ready = 1; break;
		case 'D': o.idle = 1; break;
		case 'G': o.ping_interval = atof(optarg); break;
		case 'X': o.reconnect = 1; break;
		case 'x': o.storm = atoi(optarg); break;
		case 'y': o.storm_at = atof(optarg); break;
		case 'w': o.storm_down = atof(optarg); break;
		case 'W': o.storm_concurrency = atoi(optarg); break;
		case 'T': o.token_ttl = atol(optarg); break;
		case 'L': o.label = optarg; break;
		case 'v': o.progress = 1; break;
		case 'm': o.mint = optarg; break;
		case 'l': o.show_lost = atoi(optarg); break;
		case 'o': o.conv_offset = atoi(optarg); break;
		case 'Z': o.no_kernel_ts = 1; break;
		case 'Q': o.coalesce_us = atoi(optarg); break;
		default: usage();
		}
	}
	if (optind != argc || o.secret == NULL)
		usage();
	if (o.mint != NULL) {
		char	tok[1024];

		mint_token(tok, sizeof(tok), o.mint);
		printf("%s\n", tok);
		return (0);
	}
	if (o.url == NULL || o.nconv < 1 || o.users < 1 ||
	    o.sockets_per_user < 1 || o.users * o.sockets_per_user < 2)
		usage();
	if (o.senders <= 0 || o.senders > o.users)
		o.senders = o.users;
	if (o.idle)
		o.rate = 0;
	if (o.storm_at < 0)
		o.storm_at = o.duration / 3;
	if (o.msg_size > 4000)
		o.msg_size = 4000;
	parse_hostport(o.url, "ws://", "http://", host, sizeof(host), port,
	    sizeof(port));
	if (strchr(host, ':') != NULL)
		snprintf(hostport, sizeof(hostport), "[%s]:%s", host, port);
	else
		snprintf(hostport, sizeof(hostport), "%s:%s", host, port);
	resolve(host, port, &dst, &dstlen);
	if (o.source_ips != NULL)
		parse_sources(o.source_ips);

	/* Wake-ups on time: the schedule is in microseconds. */
	prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	if (RAND_bytes((unsigned char *)&rng_state, sizeof(rng_state)) != 1 ||
	    RAND_bytes((unsigned char *)&runid, sizeof(runid)) != 1)
		fatal("RAND_bytes failed");
	rng_state |= 1;

	convs = xcalloc((size_t)o.nconv, sizeof(*convs));
	if (o.create)
		create_conversations();
	else
		load_conv_ids();
	if (o.create_only)
		return (0);

	nslots = o.users * o.sockets_per_user;
	nconns = o.nconv * nslots;
	nsenders = o.nconv * o.senders;
	bpm = ((size_t)nslots + 7) / 8;
	if (o.rate > 0 && o.rate / nsenders > 10)
		note("warning: %.1f msgs/s per sender is over the default "
		    "per-socket rate limit of 10/s", o.rate / nsenders);
	raise_nofile((rlim_t)nconns + 256);
	conns = xcalloc((size_t)nconns, sizeof(*conns));
	if ((epfd = epoll_create1(EPOLL_CLOEXEC)) == -1)
		fatal("epoll_create1: %s", strerror(errno));
	/* Launch in user order so each conversation fills up early. */
	for (i = 0; i < nconns; i++) {
		conns[i].fd = -1;
		conns[i].idx = (uint32_t)i;
		conns[i].conv = (uint32_t)(i / nslots);
		conns[i].slot = (uint32_t)(i % nslots);
		q_launch(&conns[i], 0);
	}
	interval_ns = o.rate > 0 ? (uint64_t)(1e9 / o.rate) : 0;

	t_begin = now_us();
	cpu0 = cpu_us();
	last_cpu = cpu0;
	last_prog = t_begin;
	note("run %08x: %d sockets (%d conversations x %d users x %d), "
	    "rate %.1f/s, %.1f s", runid, nconns, o.nconv, o.users,
	    o.sockets_per_user, o.rate, o.duration);

	/*
	 * Phase 0: connecting.  1: traffic or holding.  2: draining.
	 */
	for (;;) {
		now = now_us();
		next = now + 1000000;
		tt = launch_and_expire(now, phase == 0 ? o.concurrency :
		    (storm.state == 3 ? o.storm_concurrency : o.concurrency));
		if (tt < next)
			next = tt;
		if (interrupted && phase < 2) {
			phase = 2;
			t_send_end = t_send_end ? t_send_end : now;
			t_grace_end = now;
			if (t0 == 0) {
				t0 = now;
				cpu_t0 = cpu_us();
			}
		}
		if (phase == 0 && TAILQ_EMPTY(&pendq) &&
		    (TAILQ_EMPTY(&launchq) || st.open == nconns)) {
			phase = 1;
			t0 = now;
			t_ping0 = now;
			cpu_t0 = cpu_us();
			note("connected %d of %d sockets in %.2f s", st.open,
			    nconns, (now - t_begin) / 1e6);
			if (o.storm > 0)
				storm.state = 1;
		}
		if (phase == 1) {
			uint64_t	elapsed = now - t0;

			if (elapsed >= (uint64_t)(o.duration * 1e6)) {
				phase = 2;
				t_send_end = now;
				t_grace_end = now + (uint64_t)(o.grace * 1e6);
			} else if (interval_ns > 0) {
				uint64_t	due;

				due = (elapsed * 1000) / interval_ns + 1;

				while (nsched < due) {
					send_one(nsched, t0 + nsched *
					    interval_ns / 1000, now);
					nsched++;
				}
				tt = t0 + nsched * interval_ns / 1000;
				if (tt < next)
					next = tt;
			}
			if (storm.state == 1 &&
			    elapsed >= (uint64_t)(o.storm_at * 1e6))
				storm_drop(now);
			else if (storm.state == 2 && now - storm.t_drop >=
			    (uint64_t)(o.storm_down * 1e6))
				storm_reconnect(now);
		}
		if (phase >= 1 && o.ping_interval > 0) {
			uint64_t	want;

			want = (uint64_t)((double)(now - t_ping0) * nconns /
			    (o.ping_interval * 1e6));
			while (pinged < want)
				ping_one(&conns[pinged++ % (uint64_t)nconns]);
		}
		if (phase == 2) {
			int	done = st.delivered >= st.expected &&
			    st.echoes >= st.sent &&
			    (storm.state != 3 || storm.caught == storm.dropped);

			if (now >= t_grace_end || done) {
				t_end = now;
				cpu_t1 = cpu_us();
				break;
			}
			if (t_grace_end < next)
				next = t_grace_end;
		}
		if (now - last_sync >= 1000000) {
			clock_sync();
			last_sync = now;
		}
		if (o.progress && now - last_prog >= 1000000)
			progress_line(now, t0 ? t0 : t_begin, &last_cpu,
			    &last_prog);
		tt = next > now ? next - now : 0;
		if (o.coalesce_us > 0 && nev < MAX_EVENTS / 8 && tt > 0) {
			/* Let a small batch grow: fewer wake-ups per event. */
			struct timespec	ts;
			uint64_t	nap = (uint64_t)o.coalesce_us;

			if (nap > tt)
				nap = tt;

			ts.tv_sec = 0;
			ts.tv_nsec = (long)nap * 1000;
			nanosleep(&ts, NULL);
			tt -= nap;
		}
		nev = wait_events(tt);
	}
	report(t_begin, t0, t_send_end, t_end, cpu0, cpu_t0, cpu_t1);
	return (0);
}
