/* udp_forward: the C ceiling for bench/load_compare.py.
 *
 *   udp_forward --listen 127.0.0.1:PORT --to 127.0.0.1:P1[,127.0.0.1:P2...]
 *               [--prefix 28|0] [--batch 64] [--seconds MAX] [--cpu C]
 *
 * recvmmsg on the listen socket, then one sendmmsg that forwards every
 * datagram of the batch to the destinations in turn: no parsing, no routing.
 * With --prefix 28 (the default) each datagram is sent as the iovec pair
 * [28-byte PROXY v2 header, payload], the header filled from the datagram's
 * source address, which is the data-path shape of quiclb's forwarding (design
 * §4, §7) minus the CID decode. Buffers are 4 MiB, like the LB's sockets.
 * Prints "READY port=N" once bound; exits on SIGTERM, parent death or
 * --seconds, printing {"received": N, "forwarded": F, "send_errors": E}.
 */
#include "udp_common.h"

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
    const char *listen_addr = NULL, *to = NULL;
    int prefix = PROXY_V2_INET_LEN, batch = MAX_BATCH, cpu = -1;
    double seconds = 600;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--listen")) listen_addr = argv[i + 1];
        else if (!strcmp(argv[i], "--to")) to = argv[i + 1];
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
    printf("READY port=%d\n", ntohs(listen_sa.sin_port));
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
    unsigned long long received = 0, forwarded = 0, send_errors = 0;
    unsigned next_dest = 0;
    double deadline = now_seconds() + seconds;
    while (!stop_requested) {
        for (int i = 0; i < batch; i++) rmsgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
        int n = recvmmsg(in, rmsgs, (unsigned)batch, MSG_WAITFORONE, NULL);
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
    printf("{\"received\": %llu, \"forwarded\": %llu, \"send_errors\": %llu}\n", received, forwarded, send_errors);
    return 0;
}
