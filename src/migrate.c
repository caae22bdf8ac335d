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
 * Schema migrations: the files of sql/ (embedded by kodev through the
 * assets/sql link) applied in order, once each, in one transaction that
 * holds an advisory lock, so instances starting together take turns and
 * the second finds nothing left to do.
 */

#include <sys/types.h>

#include <stdio.h>
#include <string.h>

#include "parley.h"
#include "assets.h"

/* Any constant shared by every Parley instance: "parley" in ASCII. */
#define MIGRATE_LOCK_KEY	"112971114108101121"

struct migration {
	int			version;
	const char		*name;
	const u_int8_t		*sql;
};

static const struct migration migrations[] = {
	{ 1, "001_schema", asset_001_schema_sql },
	{ 2, "002_messages", asset_002_messages_sql },
	{ 3, "003_conversations", asset_003_conversations_sql },
	{ 4, "004_notifications", asset_004_notifications_sql },
	{ 5, "005_sockets", asset_005_sockets_sql },
	{ 6, "006_rest", asset_006_rest_sql },
	{ 7, "007_batch", asset_007_batch_sql },
	{ 8, "008_pages", asset_008_pages_sql },
	{ 0, NULL, NULL },
};

static int	migrate_exec(PGconn *, const char *, const char *);
static int	migrate_applied(PGconn *, int);

int
migrate_run(PGconn *pg)
{
	const struct migration	*m;
	const char		*params[2];
	char			version[16];
	PGresult		*res;
	int			ok;

	if (!migrate_exec(pg, "begin", "BEGIN") ||
	    !migrate_exec(pg, "lock", "SET LOCAL client_min_messages = warning;"
	    "SELECT pg_advisory_xact_lock(" MIGRATE_LOCK_KEY ")") ||
	    !migrate_exec(pg, "bookkeeping",
	    "CREATE TABLE IF NOT EXISTS parley_migrations ("
	    "version int PRIMARY KEY, name text NOT NULL, "
	    "applied_at timestamptz NOT NULL DEFAULT now())")) {
		(void)migrate_exec(pg, "rollback", "ROLLBACK");
		return (KORE_RESULT_ERROR);
	}

	for (m = migrations; m->name != NULL; m++) {
		if (migrate_applied(pg, m->version))
			continue;

		if (!migrate_exec(pg, m->name, (const char *)m->sql)) {
			(void)migrate_exec(pg, "rollback", "ROLLBACK");
			return (KORE_RESULT_ERROR);
		}

		(void)snprintf(version, sizeof(version), "%d", m->version);
		params[0] = version;
		params[1] = m->name;
		res = PQexecParams(pg, "INSERT INTO parley_migrations "
		    "(version, name) VALUES ($1, $2)", 2, NULL, params,
		    NULL, NULL, 0);
		ok = PQresultStatus(res) == PGRES_COMMAND_OK;
		PQclear(res);
		if (!ok) {
			(void)migrate_exec(pg, "rollback", "ROLLBACK");
			return (KORE_RESULT_ERROR);
		}

		kore_log(LOG_NOTICE, "migration %s applied", m->name);
	}

	return (migrate_exec(pg, "commit", "COMMIT"));
}

static int
migrate_applied(PGconn *pg, int version)
{
	const char	*params[1];
	char		buf[16];
	PGresult	*res;
	int		found;

	(void)snprintf(buf, sizeof(buf), "%d", version);
	params[0] = buf;

	res = PQexecParams(pg, "SELECT 1 FROM parley_migrations "
	    "WHERE version = $1", 1, NULL, params, NULL, NULL, 0);
	found = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
	PQclear(res);

	return (found);
}

static int
migrate_exec(PGconn *pg, const char *what, const char *sql)
{
	PGresult	*res;
	int		ok;

	res = PQexec(pg, sql);
	ok = PQresultStatus(res) == PGRES_COMMAND_OK ||
	    PQresultStatus(res) == PGRES_TUPLES_OK;
	if (!ok) {
		kore_log(LOG_NOTICE, "migration %s failed: %.*s", what,
		    (int)strcspn(PQerrorMessage(pg), "\n"),
		    PQerrorMessage(pg));
	}
	PQclear(res);

	return (ok);
}
