/* Shared helpers for the load-benchmark tools (bench/load_bench.py builds them).
 *
 * Loopback only: every address these tools accept must be in 127.0.0.0/8
 * (acceptance.md §2, "Local traffic only"). Every tool is bounded by a
 * wall-clock limit and dies with its parent (PR_SET_PDEATHSIG).
 */
#ifndef UDP_COMMON_H
#define UDP_COMMON_H

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SOCKET_BUFFER_BYTES (4 * 1024 * 1024) /* same as the LB's DEFAULT_BUFFER_BYTES */

static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void die(const char *what) {
    fprintf(stderr, "error: %s: %s\n", what, strerror(errno));
    exit(2);
}

static inline void die_msg(const char *msg) {
    fprintf(stderr, "error: %s\n", msg);
    exit(2);
}

/* Parse "127.x.y.z:port" into sa; refuse anything outside 127.0.0.0/8. */
static inline void parse_loopback(const char *text, struct sockaddr_in *sa) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (colon == NULL || (size_t)(colon - text) >= sizeof host) die_msg("address must be HOST:PORT");
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1) die_msg("address must be an IPv4 literal");
    if ((ntohl(sa->sin_addr.s_addr) >> 24) != 127) die_msg("refusing a non-loopback address (127.0.0.0/8 only)");
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port < 0 || port > 65535) die_msg("bad port");
    sa->sin_port = htons((uint16_t)port);
}

/* Large kernel buffers: SO_*BUFFORCE when root (ignores net.core.*mem_max), else the capped option. */
static inline void set_buffers(int fd, int bytes) {
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof bytes) != 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof bytes) != 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);
}

/* Die with the parent, so an interrupted benchmark never leaves a tool behind. */
static inline void die_with_parent(void) {
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) die("prctl");
    if (getppid() == 1) exit(3); /* the parent is already gone */
}

static inline void pin_to_cpu(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity");
}

#endif
