/* udp_sink: counts UDP datagrams on one or more loopback ports, for bench/load_bench.py.
 *
 *   udp_sink --ports P1,P2,... [--host 127.0.0.1] [--seconds MAX] [--cpu C]
 *            [--reply-to HOST:PORT | --echo]
 *
 * --reply-to: a backend answering through the LB (design §4, return mode
 * via-lb): each datagram is sent back, from the socket it arrived on, to the
 * LB's inside address. The forward leg's PROXY v2 header already reads
 * source = client, destination = VIP, which is exactly the reply header, so
 * the datagram goes back unchanged. --echo: send it back to its sender (the
 * "direct" path of the latency comparison).
 *
 * A port of 0 binds an ephemeral port. Once bound it prints
 * "READY ports=P1,P2,...". It counts datagrams with recvmmsg (batches of 64)
 * until --seconds elapse, SIGTERM/SIGINT, or end of standard input. Each line
 * read on standard input prints a snapshot; the exit prints the final count.
 * Both are one JSON line: {"received": N, "bytes": B, "per_port": {"P1": n1, ...}}.
 * Buffers are 16 MiB per socket (forced when root) so the sink is not what drops.
 */
#include "udp_common.h"

#include <sys/epoll.h>

#define MAX_PORTS 16
#define BATCH 64
#define BUF_BYTES 2048
#define SINK_BUFFER_BYTES (16 * 1024 * 1024)

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static int nports = 0;
static unsigned long long replied = 0, reply_errors = 0;
static int ports[MAX_PORTS];
static unsigned long long counts[MAX_PORTS], bytes_total = 0;

static void print_counts(int final) {
    unsigned long long total = 0;
    for (int i = 0; i < nports; i++) total += counts[i];
    printf("{\"received\": %llu, \"bytes\": %llu, \"replied\": %llu, \"reply_errors\": %llu, \"final\": %s, "
           "\"per_port\": {", total, bytes_total, replied, reply_errors, final ? "true" : "false");
    for (int i = 0; i < nports; i++) printf("%s\"%d\": %llu", i ? ", " : "", ports[i], counts[i]);
    printf("}}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    const char *port_list = NULL, *host = "127.0.0.1", *reply_to = NULL;
    int echo = 0;
    double seconds = 600;
    int cpu = -1;
    for (int i = 1; i < argc; i += 2) {
        if (!strcmp(argv[i], "--echo")) { echo = 1; i--; continue; }
        if (i + 1 >= argc) die_msg("missing option value");
        if (!strcmp(argv[i], "--ports")) port_list = argv[i + 1];
        else if (!strcmp(argv[i], "--reply-to")) reply_to = argv[i + 1];
        else if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--cpu")) cpu = atoi(argv[i + 1]);
        else die_msg("unknown option");
    }
    if (port_list == NULL) die_msg("usage: udp_sink --ports P1,P2,... [--seconds MAX]");
    if (seconds <= 0 || seconds > 3600) die_msg("--seconds must be in (0, 3600]");
    if (echo && reply_to != NULL) die_msg("--echo and --reply-to exclude each other");
    struct sockaddr_in reply_sa;
    if (reply_to != NULL) parse_loopback(reply_to, &reply_sa);
    die_with_parent();
    pin_to_cpu(cpu);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    int fds[MAX_PORTS];
    char copy[256];
    snprintf(copy, sizeof copy, "%s", port_list);
    for (char *tok = strtok(copy, ","); tok != NULL; tok = strtok(NULL, ",")) {
        if (nports == MAX_PORTS) die_msg("too many ports");
        char addr[96];
        snprintf(addr, sizeof addr, "%s:%s", host, tok);
        struct sockaddr_in sin;
        parse_loopback(addr, &sin);
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0) die("socket");
        set_buffers(fd, SINK_BUFFER_BYTES);
        if (bind(fd, (struct sockaddr *)&sin, sizeof sin) != 0) die("bind");
        socklen_t len = sizeof sin;
        getsockname(fd, (struct sockaddr *)&sin, &len);
        ports[nports] = ntohs(sin.sin_port);
        fds[nports] = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)nports};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) die("epoll_ctl");
        nports++;
    }
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = MAX_PORTS};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &sev) != 0) die("epoll_ctl stdin");
    printf("READY ports=");
    for (int i = 0; i < nports; i++) printf("%s%d", i ? "," : "", ports[i]);
    printf("\n");
    fflush(stdout);

    static char bufs[BATCH][BUF_BYTES];
    struct iovec iov[BATCH], siov[BATCH];
    struct sockaddr_in sources[BATCH];
    struct mmsghdr msgs[BATCH], smsgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    memset(smsgs, 0, sizeof smsgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = BUF_BYTES;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        siov[i].iov_base = bufs[i];
        smsgs[i].msg_hdr.msg_iov = &siov[i];
        smsgs[i].msg_hdr.msg_iovlen = 1;
        smsgs[i].msg_hdr.msg_name = echo ? (void *)&sources[i] : (void *)&reply_sa;
        smsgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        if (echo) msgs[i].msg_hdr.msg_name = &sources[i];
    }
    double deadline = now_seconds() + seconds;
    struct epoll_event events[MAX_PORTS + 1];
    while (!stop_requested && now_seconds() < deadline) {
        int n = epoll_wait(ep, events, MAX_PORTS + 1, 200);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            uint32_t idx = events[e].data.u32;
            if (idx == MAX_PORTS) {
                char line[256];
                ssize_t r = read(STDIN_FILENO, line, sizeof line);
                if (r <= 0) {
                    stop_requested = 1; /* EOF: the parent closed the pipe or died */
                    break;
                }
                for (ssize_t i = 0; i < r; i++)
                    if (line[i] == '\n') print_counts(0); /* one snapshot per request line */
                continue;
            }
            /* Drain up to 16 batches, then give the other sockets a turn. */
            for (int round = 0; round < 16; round++) {
                for (int i = 0; i < BATCH; i++) msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
                int r = recvmmsg(fds[idx], msgs, BATCH, MSG_DONTWAIT, NULL);
                if (r <= 0) break;
                counts[idx] += (unsigned long long)r;
                for (int i = 0; i < r; i++) bytes_total += msgs[i].msg_len;
                if (echo || reply_to != NULL) {
                    for (int i = 0; i < r; i++) siov[i].iov_len = msgs[i].msg_len;
                    int done = 0;
                    while (done < r) {
                        int w = sendmmsg(fds[idx], smsgs + done, (unsigned)(r - done), 0);
                        if (w < 0) {
                            if (errno == EINTR) continue;
                            reply_errors++; /* skip the datagram that failed */
                            done++;
                            continue;
                        }
                        done += w;
                        replied += (unsigned long long)w;
                    }
                }
                if (r < BATCH) break;
            }
        }
    }
    print_counts(1);
    return 0;
}
