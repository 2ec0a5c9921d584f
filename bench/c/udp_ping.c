/* udp_ping: round-trip time of single datagrams at a low rate, for bench/load_bench.py.
 *
 *   udp_ping --target 127.0.0.1:PORT --file DATAGRAMS --rate R --count N
 *            [--timeout-ms T] [--cpu C]
 *
 * Sends the first datagram of DATAGRAMS (the --file format of udp_blast)
 * N times, one at a time, paced at R per second, with a sequence number in
 * its last 8 bytes, and waits up to T ms for the reply carrying that number
 * (an echo, or a reply that crossed the LB twice). Only one datagram is ever
 * in flight, so the figure is pure latency, never queueing.
 *
 * Prints one JSON line: {"sent": N, "received": R, "p50_us": ..., "p99_us": ..., ...}.
 */
#include "udp_common.h"

#include <poll.h>
#include <sys/stat.h>

#define MAX_COUNT 1000000

static int compare_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, size_t n, double q) {
    if (n == 0) return -1;
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return sorted[i];
}

int main(int argc, char **argv) {
    const char *target = NULL, *file = NULL;
    double rate = 1000;
    long count = 1000;
    int timeout_ms = 200, cpu = -1;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--target")) target = argv[i + 1];
        else if (!strcmp(argv[i], "--file")) file = argv[i + 1];
        else if (!strcmp(argv[i], "--rate")) rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--count")) count = atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--timeout-ms")) timeout_ms = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--cpu")) cpu = atoi(argv[i + 1]);
        else die_msg("unknown option");
    }
    if (target == NULL || file == NULL) die_msg("usage: udp_ping --target HOST:PORT --file F --rate R --count N");
    if (rate <= 0 || rate > 100000) die_msg("--rate must be in (0, 100000]");
    if (count < 1 || count > MAX_COUNT) die_msg("--count must be 1..1000000");
    if (timeout_ms < 1 || timeout_ms > 5000) die_msg("--timeout-ms must be 1..5000");
    die_with_parent();
    pin_to_cpu(cpu);
    (void)prctl(PR_SET_TIMERSLACK, 1000UL);

    struct sockaddr_in dst;
    parse_loopback(target, &dst);
    FILE *f = fopen(file, "rb");
    if (f == NULL) die("open datagram file");
    unsigned char lenb[2], dgram[2048], reply[2048];
    if (fread(lenb, 1, 2, f) != 2) die_msg("empty datagram file");
    size_t len = ((size_t)lenb[0] << 8) | lenb[1];
    if (len < 16 || len > sizeof dgram || fread(dgram, 1, len, f) != len) die_msg("bad first datagram");
    fclose(f);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(fd, (struct sockaddr *)&src, sizeof src) != 0) die("bind");
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) != 0) die("connect");

    double *rtts = malloc((size_t)count * sizeof *rtts);
    if (rtts == NULL) die("malloc");
    size_t got = 0;
    long lost = 0, stray = 0;
    double start = now_seconds();
    for (long seq = 0; seq < count; seq++) {
        double due = start + (double)seq / rate;
        struct timespec ts = {.tv_sec = (time_t)due, .tv_nsec = (long)((due - (double)(time_t)due) * 1e9)};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
        uint64_t tag = (uint64_t)seq;
        memcpy(dgram + len - 8, &tag, 8);
        double t0 = now_seconds();
        if (send(fd, dgram, len, 0) < 0) {
            lost++;
            continue;
        }
        double give_up = t0 + timeout_ms / 1000.0;
        for (;;) {
            double left = give_up - now_seconds();
            if (left <= 0) {
                lost++;
                break;
            }
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (poll(&p, 1, (int)(left * 1000) + 1) <= 0) continue;
            ssize_t r = recv(fd, reply, sizeof reply, MSG_DONTWAIT);
            double t1 = now_seconds();
            if (r < 8) continue;
            uint64_t back;
            memcpy(&back, reply + r - 8, 8);
            if (back != tag) {
                stray++; /* a late reply to an earlier ping that timed out */
                continue;
            }
            rtts[got++] = (t1 - t0) * 1e6;
            break;
        }
    }
    qsort(rtts, got, sizeof *rtts, compare_double);
    printf("{\"sent\": %ld, \"received\": %zu, \"lost\": %ld, \"stray\": %ld, \"min_us\": %.1f, \"p50_us\": %.1f, "
           "\"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f}\n",
           count, got, lost, stray, got ? rtts[0] : -1.0, percentile(rtts, got, 0.5), percentile(rtts, got, 0.9),
           percentile(rtts, got, 0.99), got ? rtts[got - 1] : -1.0);
    return 0;
}
