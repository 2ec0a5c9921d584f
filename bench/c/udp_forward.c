/* udp_forward: the C ceiling for bench/load_bench.py.
 *
 *   udp_forward --listen 127.0.0.1:PORT --to 127.0.0.1:P1[,127.0.0.1:P2...]
 *               [--prefix 28|0] [--batch 64] [--seconds MAX] [--cpu C]
 *               [--inside 127.0.0.1:PORT]
 *
 * recvmmsg on the listen socket, then one sendmmsg that forwards every
 * datagram of the batch to the destinations in turn: no parsing, no routing.
 * With --prefix 28 (the default) each datagram is sent as the iovec pair
 * [28-byte PROXY v2 header, payload], the header filled from the datagram's
 * source address, which is the data-path shape of quiclb's forwarding (design
 * §4, §7) minus the CID decode. Buffers are 4 MiB, like the LB's sockets.
 * --inside adds quiclb's return path (design §4, via-lb): datagrams arriving
 * there carry a 28-byte PROXY v2 header whose source is the client; the
 * header is stripped by offset (iovec past it, no copy) and the payload sent
 * to the client from the listen socket (the VIP). No trust check beyond the
 * signature: this is the ceiling, not a product.
 * Prints "READY port=N [inside=M]" once bound; exits on SIGTERM, parent death or
 * --seconds, printing {"received": N, "forwarded": F, "send_errors": E}.
 */
#include "udp_common.h"

#include <poll.h>

#define MAX_BATCH 64
#define MAX_DESTS 16
#define BUF_BYTES 2048
#define PROXY_V2_INET_LEN 28

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static const unsigned char PROXY_SIGNATURE[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                                  0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

int main(int argc, char **argv) {
    const char *listen_addr = NULL, *to = NULL, *inside_addr = NULL;
    int prefix = PROXY_V2_INET_LEN, batch = MAX_BATCH, cpu = -1;
    double seconds = 600;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--listen")) listen_addr = argv[i + 1];
        else if (!strcmp(argv[i], "--to")) to = argv[i + 1];
        else if (!strcmp(argv[i], "--inside")) inside_addr = argv[i + 1];
        else if (!strcmp(argv[i], "--prefix")) prefix = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--cpu")) cpu = atoi(argv[i + 1]);
        else die_msg("unknown option");
    }
    if (listen_addr == NULL || to == NULL) die_msg("usage: udp_forward --listen HOST:PORT --to HOST:PORT[,...]");
    if (prefix != 0 && prefix != PROXY_V2_INET_LEN) die_msg("--prefix must be 0 or 28");
    if (batch < 1 || batch > MAX_BATCH) die_msg("--batch must be 1..64");
    if (seconds <= 0 || seconds > 3600) die_msg("--seconds must be in (0, 3600]");
    die_with_parent();
    pin_to_cpu(cpu);
    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: recvmmsg returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct sockaddr_in listen_sa, dests[MAX_DESTS];
    parse_loopback(listen_addr, &listen_sa);
    int ndests = 0;
    char copy[512];
    snprintf(copy, sizeof copy, "%s", to);
    for (char *tok = strtok(copy, ","); tok != NULL; tok = strtok(NULL, ",")) {
        if (ndests == MAX_DESTS) die_msg("too many destinations");
        parse_loopback(tok, &dests[ndests++]);
    }

    int in = socket(AF_INET, SOCK_DGRAM, 0);
    int out = socket(AF_INET, SOCK_DGRAM, 0);
    if (in < 0 || out < 0) die("socket");
    set_buffers(in, SOCKET_BUFFER_BYTES);
    set_buffers(out, SOCKET_BUFFER_BYTES);
    if (bind(in, (struct sockaddr *)&listen_sa, sizeof listen_sa) != 0) die("bind");
    struct sockaddr_in out_sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(out, (struct sockaddr *)&out_sa, sizeof out_sa) != 0) die("bind out");
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000}; /* wake up to check the deadline */
    setsockopt(in, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    socklen_t slen = sizeof listen_sa;
    getsockname(in, (struct sockaddr *)&listen_sa, &slen);
    int ret = -1;
    struct sockaddr_in inside_sa;
    if (inside_addr != NULL) {
        parse_loopback(inside_addr, &inside_sa);
        ret = socket(AF_INET, SOCK_DGRAM, 0);
        if (ret < 0) die("socket");
        set_buffers(ret, SOCKET_BUFFER_BYTES);
        if (bind(ret, (struct sockaddr *)&inside_sa, sizeof inside_sa) != 0) die("bind inside");
        slen = sizeof inside_sa;
        getsockname(ret, (struct sockaddr *)&inside_sa, &slen);
        printf("READY port=%d inside=%d\n", ntohs(listen_sa.sin_port), ntohs(inside_sa.sin_port));
    } else {
        printf("READY port=%d\n", ntohs(listen_sa.sin_port));
    }
    fflush(stdout);

    static unsigned char bufs[MAX_BATCH][BUF_BYTES];
    static unsigned char headers[MAX_BATCH][PROXY_V2_INET_LEN];
    struct sockaddr_in sources[MAX_BATCH];
    struct iovec riov[MAX_BATCH], siov[MAX_BATCH][2];
    struct mmsghdr rmsgs[MAX_BATCH], smsgs[MAX_BATCH];
    memset(rmsgs, 0, sizeof rmsgs);
    memset(smsgs, 0, sizeof smsgs);
    for (int i = 0; i < MAX_BATCH; i++) {
        riov[i].iov_base = bufs[i];
        riov[i].iov_len = BUF_BYTES;
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
        rmsgs[i].msg_hdr.msg_name = &sources[i];
        /* The constant part of a PROXY v2 header: PROXY command, INET + DGRAM, 12 address bytes. */
        memcpy(headers[i], PROXY_SIGNATURE, sizeof PROXY_SIGNATURE);
        headers[i][12] = 0x21;
        headers[i][13] = 0x12;
        headers[i][14] = 0;
        headers[i][15] = 12;
        memcpy(headers[i] + 20, &listen_sa.sin_addr, 4);
        memcpy(headers[i] + 26, &listen_sa.sin_port, 2);
        siov[i][0].iov_base = headers[i];
        siov[i][0].iov_len = PROXY_V2_INET_LEN;
        siov[i][1].iov_base = bufs[i];
        smsgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
    }
    static unsigned char rbufs[MAX_BATCH][BUF_BYTES];
    struct sockaddr_in clients[MAX_BATCH];
    struct iovec rriov[MAX_BATCH], rsiov[MAX_BATCH];
    struct mmsghdr rrmsgs[MAX_BATCH], rsmsgs[MAX_BATCH];
    memset(rrmsgs, 0, sizeof rrmsgs);
    memset(rsmsgs, 0, sizeof rsmsgs);
    for (int i = 0; i < MAX_BATCH; i++) {
        rriov[i].iov_base = rbufs[i];
        rriov[i].iov_len = BUF_BYTES;
        rrmsgs[i].msg_hdr.msg_iov = &rriov[i];
        rrmsgs[i].msg_hdr.msg_iovlen = 1;
        rsiov[i].iov_base = rbufs[i] + PROXY_V2_INET_LEN;
        rsmsgs[i].msg_hdr.msg_iov = &rsiov[i];
        rsmsgs[i].msg_hdr.msg_iovlen = 1;
        clients[i].sin_family = AF_INET;
        rsmsgs[i].msg_hdr.msg_name = &clients[i];
        rsmsgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
    }
    unsigned long long received = 0, forwarded = 0, send_errors = 0;
    unsigned long long returned_in = 0, returned = 0, return_rejected = 0;
    unsigned next_dest = 0;
    double deadline = now_seconds() + seconds;
    struct pollfd pfds[2] = {{.fd = in, .events = POLLIN}, {.fd = ret, .events = POLLIN}};
    while (!stop_requested) {
        if (ret >= 0) {
            /* Both directions: wait for either socket, then serve the return path first. */
            int p = poll(pfds, 2, 200);
            if (p < 0 && errno != EINTR) die("poll");
            if (now_seconds() >= deadline) break;
            if (p <= 0) continue;
            int m = (pfds[1].revents & POLLIN) ? recvmmsg(ret, rrmsgs, (unsigned)batch, MSG_DONTWAIT, NULL) : 0;
            int k = 0;
            for (int i = 0; i < m; i++) {
                returned_in++;
                const unsigned char *b = rbufs[i];
                if (rrmsgs[i].msg_len < PROXY_V2_INET_LEN || memcmp(b, PROXY_SIGNATURE, 12) != 0) {
                    return_rejected++;
                    continue;
                }
                /* Compact the accepted replies into slots 0..k-1 (pointer swaps, not payload copies). */
                memcpy(&clients[k].sin_addr, b + 16, 4);
                memcpy(&clients[k].sin_port, b + 24, 2);
                rsiov[k].iov_base = rbufs[i] + PROXY_V2_INET_LEN;
                rsiov[k].iov_len = rrmsgs[i].msg_len - PROXY_V2_INET_LEN;
                k++;
            }
            int done = 0;
            while (done < k) {
                int r = sendmmsg(in, rsmsgs + done, (unsigned)(k - done), 0);
                if (r < 0) {
                    if (errno == EINTR) continue;
                    send_errors++;
                    done++;
                    continue;
                }
                done += r;
                returned += (unsigned long long)r;
            }
            if (!(pfds[0].revents & POLLIN)) continue;
        }
        for (int i = 0; i < batch; i++) rmsgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        int n = recvmmsg(in, rmsgs, (unsigned)batch, ret >= 0 ? MSG_DONTWAIT : MSG_WAITFORONE, NULL);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) die("recvmmsg");
            if (now_seconds() >= deadline) break;
            continue;
        }
        received += (unsigned long long)n;
        for (int i = 0; i < n; i++) {
            struct msghdr *h = &smsgs[i].msg_hdr;
            if (prefix) {
                memcpy(headers[i] + 16, &sources[i].sin_addr, 4);
                memcpy(headers[i] + 24, &sources[i].sin_port, 2);
                siov[i][1].iov_len = rmsgs[i].msg_len;
                h->msg_iov = siov[i];
                h->msg_iovlen = 2;
            } else {
                siov[i][1].iov_len = rmsgs[i].msg_len;
                h->msg_iov = &siov[i][1];
                h->msg_iovlen = 1;
            }
            h->msg_name = &dests[next_dest];
            if (++next_dest == (unsigned)ndests) next_dest = 0;
        }
        int done = 0;
        while (done < n) {
            int r = sendmmsg(out, smsgs + done, (unsigned)(n - done), 0);
            if (r < 0) {
                if (errno == EINTR) continue;
                send_errors++; /* skip the datagram that failed */
                done++;
                continue;
            }
            done += r;
            forwarded += (unsigned long long)r;
        }
        if ((received & 0xFFF) < (unsigned long long)n && now_seconds() >= deadline) break;
    }
    printf("{\"received\": %llu, \"forwarded\": %llu, \"send_errors\": %llu, \"return_received\": %llu, "
           "\"returned\": %llu, \"return_rejected\": %llu}\n",
           received, forwarded, send_errors, returned_in, returned, return_rejected);
    return 0;
}
