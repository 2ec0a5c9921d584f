/* udp_blast: UDP load generator for the load benchmark (bench/load_bench.py).
 *
 *   udp_blast --target 127.0.0.1:PORT (--file DATAGRAMS | --heads HEADS --size S)
 *             --rate R --seconds S [--sockets K] [--chunk N] [--start I] [--cpu C]
 *             [--replies] [--linger SECONDS] [--count MAX_DATAGRAMS]
 *
 * Every datagram is prebuilt, so the generator does nothing per datagram but
 * point an iovec at it: that is what lets it outrun the targets it loads.
 *
 * --file: 2-byte big-endian length + bytes, repeated (mixed sizes allowed).
 * --heads: a 2-byte big-endian head length H, then heads of H bytes each
 *   (first octet + DCID); each datagram is [head, shared padding to S bytes],
 *   sent as two iovecs. 1M distinct DCIDs then cost 18 MB, not 1.2 GB.
 *
 * Datagrams are sent in order from index --start, round robin over K
 * connected sockets with distinct source ports. Pacing is an absolute
 * schedule: chunk i leaves at start + i*N/R; a generator more than 20 ms
 * behind forgives the backlog instead of bursting it, so "offered" (sent /
 * seconds) is below the asked rate exactly when the generator is the limit.
 * (2 ms was too tight on a VM: late timer wakeups alone forgave 10% at 50k/s.)
 * --rate 0 sends as fast as possible (capacity probes). Bounded by --seconds
 * and by --count datagrams (default 10^8), whichever comes first.
 *
 * --replies: also count datagrams arriving on the sockets (a round trip
 * through the target), drained between chunks and for up to --linger seconds
 * after the last send (until 100 ms pass without one).
 *
 * Prints one JSON line: {"sent": N, "seconds": T, "errors": E, "received": R, ...}.
 */
#include "udp_common.h"

#include <poll.h>
#include <sys/stat.h>

#define MAX_CHUNK 64
#define MAX_SOCKETS 64
#define MAX_BACKLOG_SECONDS 0.020
#define DRAIN_INTERVAL_SECONDS 0.0005
#define RX_BATCH 64
#define RX_BYTES 2048

static int fds[MAX_SOCKETS];
static int nsockets = 8;
static unsigned long long received = 0;

/* Read everything queued on every socket (MSG_DONTWAIT); returns how many datagrams. */
static unsigned drain_replies(void) {
    static char bufs[RX_BATCH][RX_BYTES];
    static struct iovec iov[RX_BATCH];
    static struct mmsghdr msgs[RX_BATCH];
    static int ready = 0;
    if (!ready) {
        for (int i = 0; i < RX_BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = RX_BYTES;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        ready = 1;
    }
    unsigned got = 0;
    for (int s = 0; s < nsockets; s++) {
        for (;;) {
            int r = recvmmsg(fds[s], msgs, RX_BATCH, MSG_DONTWAIT, NULL);
            if (r <= 0) break;
            got += (unsigned)r;
            if (r < RX_BATCH) break;
        }
    }
    received += got;
    return got;
}

static unsigned char *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) die("open datagram file");
    struct stat st;
    if (fstat(fileno(f), &st) != 0) die("stat");
    unsigned char *blob = malloc((size_t)st.st_size + 1);
    if (blob == NULL || fread(blob, 1, (size_t)st.st_size, f) != (size_t)st.st_size) die("read datagram file");
    fclose(f);
    *size = (size_t)st.st_size;
    return blob;
}

int main(int argc, char **argv) {
    const char *target = NULL, *file = NULL, *heads = NULL;
    double rate = 0, seconds = 1, linger = 0.5;
    int chunk = 0, cpu = -1, size = 0, replies = 0;
    long long start_index = 0;
    unsigned long long max_count = 100000000ULL; /* a bound in datagrams beside the bound in time */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--replies")) { replies = 1; continue; }
        if (i + 1 >= argc) die_msg("missing option value");
        const char *v = argv[++i];
        if (!strcmp(argv[i - 1], "--target")) target = v;
        else if (!strcmp(argv[i - 1], "--file")) file = v;
        else if (!strcmp(argv[i - 1], "--heads")) heads = v;
        else if (!strcmp(argv[i - 1], "--size")) size = atoi(v);
        else if (!strcmp(argv[i - 1], "--rate")) rate = atof(v);
        else if (!strcmp(argv[i - 1], "--seconds")) seconds = atof(v);
        else if (!strcmp(argv[i - 1], "--sockets")) nsockets = atoi(v);
        else if (!strcmp(argv[i - 1], "--chunk")) chunk = atoi(v);
        else if (!strcmp(argv[i - 1], "--start")) start_index = atoll(v);
        else if (!strcmp(argv[i - 1], "--linger")) linger = atof(v);
        else if (!strcmp(argv[i - 1], "--count")) max_count = strtoull(v, NULL, 10);
        else if (!strcmp(argv[i - 1], "--cpu")) cpu = atoi(v);
        else die_msg("unknown option");
    }
    if (target == NULL || (file == NULL) == (heads == NULL))
        die_msg("usage: udp_blast --target HOST:PORT (--file F | --heads F --size S) --rate R --seconds S");
    if (seconds <= 0 || seconds > 600) die_msg("--seconds must be in (0, 600]");
    if (linger < 0 || linger > 10) die_msg("--linger must be in [0, 10]");
    if (rate < 0) die_msg("--rate must be >= 0");
    if (nsockets < 1 || nsockets > MAX_SOCKETS) die_msg("--sockets must be 1..64");
    if (chunk <= 0) chunk = rate > 0 ? (int)(rate / 5000) : MAX_CHUNK;
    if (chunk < 1) chunk = 1;
    if (chunk > MAX_CHUNK) chunk = MAX_CHUNK;
    die_with_parent();
    pin_to_cpu(cpu);
    (void)prctl(PR_SET_TIMERSLACK, 1000UL); /* 1 us sleep slack instead of 50 us: tighter pacing */

    struct sockaddr_in dst;
    parse_loopback(target, &dst);

    /* Each datagram is one or two iovecs: [bytes] (--file) or [head, padding] (--heads). */
    size_t blob_size, count = 0;
    unsigned char *blob = read_file(file ? file : heads, &blob_size);
    struct iovec *iovs;
    int per = 1;
    if (file != NULL) {
        for (size_t off = 0; off + 2 <= blob_size;) {
            size_t len = ((size_t)blob[off] << 8) | blob[off + 1];
            off += 2 + len;
            if (off > blob_size) die_msg("truncated datagram file");
            count++;
        }
        if (count == 0) die_msg("empty datagram file");
        iovs = calloc(count, sizeof *iovs);
        if (iovs == NULL) die("calloc");
        size_t off = 0;
        for (size_t k = 0; k < count; k++) {
            size_t len = ((size_t)blob[off] << 8) | blob[off + 1];
            iovs[k].iov_base = blob + off + 2;
            iovs[k].iov_len = len;
            off += 2 + len;
        }
    } else {
        if (blob_size < 2) die_msg("empty heads file");
        size_t hlen = ((size_t)blob[0] << 8) | blob[1];
        if (hlen == 0 || (blob_size - 2) % hlen != 0) die_msg("heads file: size is not a multiple of the head length");
        if (size < (int)hlen || size > 65507) die_msg("--size must be >= the head length and <= 65507");
        count = (blob_size - 2) / hlen;
        static unsigned char pad[65507];
        for (int i = 0; i < size; i++) pad[i] = (unsigned char)(i * 131 + 7); /* fixed filler */
        per = 2;
        iovs = calloc(2 * count, sizeof *iovs);
        if (iovs == NULL) die("calloc");
        for (size_t k = 0; k < count; k++) {
            iovs[2 * k].iov_base = blob + 2 + k * hlen;
            iovs[2 * k].iov_len = hlen;
            iovs[2 * k + 1].iov_base = pad;
            iovs[2 * k + 1].iov_len = (size_t)size - hlen;
        }
    }

    for (int s = 0; s < nsockets; s++) {
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
    size_t next = (size_t)(start_index % (long long)count);
    int sock = 0;
    double start = now_seconds(), deadline = start + seconds, now = start, last_drain = start;
    while ((now = now_seconds()) < deadline && sent < max_count) {
        if (replies && now - last_drain >= DRAIN_INTERVAL_SECONDS) {
            drain_replies();
            last_drain = now;
        }
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
                if (replies && due - now > DRAIN_INTERVAL_SECONDS) due = now + DRAIN_INTERVAL_SECONDS;
                struct timespec ts = {.tv_sec = (time_t)due, .tv_nsec = (long)((due - (double)(time_t)due) * 1e9)};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
                continue;
            }
        }
        for (int i = 0; i < chunk; i++) {
            msgs[i].msg_hdr.msg_iov = &iovs[per * next];
            msgs[i].msg_hdr.msg_iovlen = (size_t)per;
            if (++next == count) next = 0;
        }
        int done = 0;
        while (done < chunk) {
            int r = sendmmsg(fds[sock], msgs + done, (unsigned)(chunk - done), 0);
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
        if (++sock == nsockets) sock = 0;
    }
    double elapsed = now_seconds() - start;
    if (replies) { /* the last replies are still crossing the target */
        double quiet_since = now_seconds(), stop_at = quiet_since + linger;
        while ((now = now_seconds()) < stop_at && now - quiet_since < 0.1) {
            if (drain_replies() > 0) quiet_since = now;
            else usleep(1000);
        }
    }
    printf("{\"sent\": %llu, \"seconds\": %.6f, \"errors\": %llu, \"received\": %llu, \"rate_target\": %.0f, "
           "\"chunk\": %d, \"sockets\": %d, \"calls\": %llu, \"forgiven\": %llu, \"distinct\": %zu, "
           "\"end_index\": %zu}\n",
           sent, elapsed, errors, received, rate, chunk, nsockets, calls, forgiven, count, next);
    return 0;
}
