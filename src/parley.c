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

/* Kore's hooks: how the parent starts and what each worker sets up. */

#include <sys/types.h>
#include <sys/resource.h>

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <kore/hooks.h>
#include <kore/seccomp.h>

#include "parley.h"

/*
 * What libpq and glibc need beyond Kore's worker filter on Debian 12:
 * stat() is newfstatat (libpq looks for ~/.pgpass and root.crt), and
 * uname plus the datagram calls let a host name be resolved.
 */
static struct sock_filter filter_parley[] = {
	KORE_SYSCALL_ALLOW(newfstatat),
	KORE_SYSCALL_ALLOW(uname),
	KORE_SYSCALL_ALLOW(sendmmsg),
	KORE_SYSCALL_ALLOW(recvmsg),
	KORE_SYSCALL_ALLOW(bind),
	KORE_SYSCALL_ALLOW(getppid),
};

pid_t	parley_parent_pid;

void
kore_seccomp_hook(void)
{
	kore_seccomp_filter("parley", filter_parley,
	    KORE_FILTER_LEN(filter_parley));
}

static void	parley_set_limits(void);

void
kore_parent_configure(int argc, char **argv)
{
	struct kore_server	*srv;

	/* Kore's single binary leaves -f -n -r to us (KORE-NOTES 0.1). */
	kore_default_getopt(argc, argv);

	/* Logs go to a pipe under systemd and tests: keep them whole. */
	(void)setvbuf(stdout, NULL, _IOLBF, 0);

	config_load();
	metrics_init();
	parley_parent_pid = getpid();

	worker_count = parley_cfg.workers;
	parley_set_limits();

	srv = kore_server_create("parley");
	srv->tls = 0;
	if (!kore_server_bind(srv, parley_cfg.listen_host,
	    parley_cfg.listen_port, NULL)) {
		fprintf(stderr, "parley: cannot listen on PARLEY_LISTEN "
		    "%s:%s\n", parley_cfg.listen_host, parley_cfg.listen_port);
		exit(1);
	}
	kore_server_finalize(srv);
}

void
kore_worker_configure(void)
{
	metrics_worker_start();
	hub_init();
	ws_init();
	fanout_init();
	batch_init();
	db_init();
}

void
kore_worker_teardown(void)
{
	ws_drain();
	db_shutdown();
}

/*
 * Every socket is a connection and a descriptor: raise the soft limit to
 * the hard one (raise that with LimitNOFILE= under systemd). Kore adds the
 * descriptors a worker already holds to worker_rlimit_nofiles, so leave it
 * room below the hard limit, and keep some for the database and logs.
 */
static void
parley_set_limits(void)
{
	struct rlimit	rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == -1)
		fatal("getrlimit: %s", errno_s);
	if (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > 1048576)
		rl.rlim_max = 1048576;
	rl.rlim_cur = rl.rlim_max;
	(void)setrlimit(RLIMIT_NOFILE, &rl);

	if (rl.rlim_max < 1024)
		rl.rlim_max = 1024;
	worker_rlimit_nofiles = rl.rlim_max - 128;
	worker_max_connections = rl.rlim_max - 256;
}
