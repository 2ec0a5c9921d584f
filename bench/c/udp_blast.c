/* udp_blast: paced UDP load generator for bench/load_compare.py.
 *
 *   udp_blast --target 127.0.0.1:PORT --file DATAGRAMS --rate R --seconds S
 *             [--sockets K] [--chunk N] [--cpu C]
 *
 * DATAGRAMS holds pre-built datagrams, each as a 2-byte big-endian length and
 * the bytes. They are sent round-robin with sendmmsg, in chunks, from K
 * connected sockets with distinct source ports (so a SO_REUSEPORT group on
 * the target would spread them). Pacing is an absolute schedule: chunk i
 * leaves at start + i*N/R; a generator that falls more than 2 ms behind
 * forgives the backlog instead of bursting it. --rate 0 sends as fast as
 * possible. The chunk defaults to R/10000 (1..64): about 10k sendmmsg calls
 * a second, so bursts stay short. Bounded by --seconds.
 *
 * Prints one JSON line: {"sent": N, "seconds": T, "errors": E, ...}.
 */
#include "udp_common.h"

#include <sys/stat.h>

#define MAX_CHUNK 64
#define MAX_SOCKETS 64
#define MAX_BACKLOG_SECONDS 0.002

int main(int argc, char **argv) {
    const char *target = NULL, *file = NULL;
    double rate = 0, seconds = 1;
    int sockets = 8, chunk = 0, cpu = -1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--target")) target = argv[i + 1];
        else if (!strcmp(argv[i], "--file")) file = argv[i + 1];
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--sockets")) sockets = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--chunk")) chunk = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cpu")) cpu = atoi(argv[i + 1]);
        else die_msg("unknown option");
    }
    if (target == NULL || file == NULL) die_msg("usage: udp_blast --target HOST:PORT --file F --rate R --seconds S");
    if (seconds <= 0 || seconds > 600) die_msg("--seconds must be in (0, 600]");
    if (rate < 0) die_msg("--rate must be >= 0");
    if (sockets < 1 || sockets > MAX_SOCKETS) die_msg("--sockets must be 1..64");
    if (chunk <= 0) chunk = rate > 0 ? (int)(rate / 10000) : MAX_CHUNK;
    if (chunk < 1) chunk = 1;
    if (chunk > MAX_CHUNK) chunk = MAX_CHUNK;
    die_with_parent();
    pin_to_cpu(cpu);
    (void)prctl(PR_SET_TIMERSLACK, 1000UL); /* 1 us sleep slack instead of 50 us: tighter pacing */

    struct sockaddr_in dst;
    parse_loopback(target, &dst);

    /* Load the datagrams. */
    FILE *f = fopen(file, "rb");
    if (f == NULL) die("open datagram file");
    struct stat st;
    if (fstat(fileno(f), &st) != 0) die("stat");
    unsigned char *blob = malloc((size_t)st.st_size + 1);
    if (blob == NULL || fread(blob, 1, (size_t)st.st_size, f) != (size_t)st.st_size) die("read datagram file");
    fclose(f);
    size_t count = 0;
    for (size_t off = 0; off + 2 <= (size_t)st.st_size;) {
        size_t len = ((size_t)blob[off] << 8) | blob[off + 1];
        off += 2 + len;
        if (off > (size_t)st.st_size) die_msg("truncated datagram file");
        count++;
    }
    if (count == 0) die_msg("empty datagram file");
    struct iovec *dgrams = calloc(count, sizeof *dgrams);
    size_t k = 0;
    for (size_t off = 0; k < count; k++) {
        size_t len = ((size_t)blob[off] << 8) | blob[off + 1];
        dgrams[k].iov_base = blob + off + 2;
        dgrams[k].iov_len = len;
        off += 2 + len;
    }

    int fds[MAX_SOCKETS];
    for (int s = 0; s < sockets; s++) {
        fds[s] = socket(AF_INET, SOCK_DGRAM, 0);
        if (fds[s] < 0) die("socket");
        set_buffers(fds[s], SOCKET_BUFFER_BYTES);
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (bind(fds[s], (struct sockaddr *)&src, sizeof src) != 0) die("bind");
        if (connect(fds[s], (struct sockaddr *)&dst, sizeof dst) != 0) die("connect");
    }

    struct mmsghdr msgs[MAX_CHUNK];
    memset(msgs, 0, sizeof msgs);
    unsigned long long sent = 0, errors = 0, calls = 0, forgiven = 0;
    size_t next = 0;
    int sock = 0;
    double start = now_seconds(), deadline = start + seconds, now = start;
    while ((now = now_seconds()) < deadline) {
        int n = chunk;
        if (rate > 0) {
            double earned = (now - start) * rate - (double)forgiven;
            if (earned - (double)sent > rate * MAX_BACKLOG_SECONDS + chunk) {
                unsigned long long drop = (unsigned long long)(earned - (double)sent - chunk);
                forgiven += drop;
                earned -= (double)drop;
            }
            if (earned < (double)(sent + (unsigned long long)chunk)) {
                double due = start + ((double)(sent + (unsigned long long)chunk + forgiven)) / rate;
                if (due > deadline) due = deadline;
                struct timespec ts = {.tv_sec = (time_t)due, .tv_nsec = (long)((due - (double)(time_t)due) * 1e9)};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                continue;
            }
        }
        for (int i = 0; i < n; i++) {
            msgs[i].msg_hdr.msg_iov = &dgrams[next];
            msgs[i].msg_hdr.msg_iovlen = 1;
            if (++next == count) next = 0;
        }
        int done = 0;
        while (done < n) {
            int r = sendmmsg(fds[sock], msgs + done, (unsigned)(n - done), 0);
            calls++;
            if (r < 0) {
                if (errno == EINTR) continue;
                errors++; /* e.g. ECONNREFUSED after an ICMP: count it, skip the datagram */
                done++;
                continue;
            }
            done += r;
            sent += (unsigned long long)r;
        }
        if (++sock == sockets) sock = 0;
    }
    double elapsed = now_seconds() - start;
    printf("{\"sent\": %llu, \"seconds\": %.6f, \"errors\": %llu, \"rate_target\": %.0f, \"chunk\": %d, "
           "\"sockets\": %d, \"calls\": %llu, \"forgiven\": %llu, \"distinct\": %zu}\n",
           sent, elapsed, errors, rate, chunk, sockets, calls, forgiven, count);
    return 0;
}
