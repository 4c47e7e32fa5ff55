/* A small fast load generator for perf/bench.py (single-threaded, epoll).
 *
 *   loadgen MODE TARGET HELLO_FILE CONCURRENCY COUNT SECONDS [SIZE [READ_SIZE]]
 *
 * TARGET is tcp:127.0.0.1:PORT or unix:/path.  Every connection first sends the bytes
 * of HELLO_FILE (a real ClientHello) and waits for a 2-byte reply.  Then, by MODE:
 *   conn   close; repeat until COUNT connections or SECONDS (CONCURRENCY in flight)
 *   msg    CONCURRENCY connections exchange SIZE-byte ping-pong messages, COUNT in all
 *   idle   open COUNT connections and hold them; print a "ready" line, then wait for
 *          stdin to close (or SECONDS), close them all
 *   bulk   one connection reads SIZE bytes (or for SECONDS) from a source backend, by
 *          blocking recv()s of READ_SIZE bytes (default 262144)
 * Prints one JSON line of results, including this process's own CPU seconds.
 * Every loop is bounded by COUNT and SECONDS.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { CONNECTING, AWAIT_REPLY, AWAIT_ECHO, HOLDING, FREE };
enum { M_CONN, M_MSG, M_IDLE, M_BULK };

struct slot { int fd, phase, got; double t0; };

static int mode;
static struct sockaddr_storage addr;
static socklen_t addrlen;
static char *hello;
static int hello_len;
static long count, size, read_size = 262144;
static double seconds, deadline, t_begin;
static struct slot *slots;
static int nslots, ep;
static uint32_t *lat;
static long nlat, started, done, errors, active;
static char msgbuf[65536];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_target(const char *t) {
    memset(&addr, 0, sizeof addr);
    if (!strncmp(t, "unix:", 5)) {
        struct sockaddr_un *u = (struct sockaddr_un *)&addr;
        u->sun_family = AF_UNIX;
        if (strlen(t + 5) >= sizeof u->sun_path) return -1;
        strcpy(u->sun_path, t + 5);
        addrlen = sizeof *u;
        return 0;
    }
    if (strncmp(t, "tcp:", 4)) return -1;
    char host[64];
    const char *colon = strrchr(t + 4, ':');
    if (!colon || colon - (t + 4) >= (long)sizeof host) return -1;
    memcpy(host, t + 4, colon - (t + 4));
    host[colon - (t + 4)] = 0;
    struct sockaddr_in *in = (struct sockaddr_in *)&addr;
    in->sin_family = AF_INET;
    in->sin_port = htons(atoi(colon + 1));
    if (inet_pton(AF_INET, host, &in->sin_addr) != 1) return -1;
    addrlen = sizeof *in;
    return 0;
}

static int read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    hello = malloc(65536);
    hello_len = fread(hello, 1, 65536, f);
    fclose(f);
    return hello_len > 0 ? 0 : -1;
}

static void watch(int i, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = i};
    epoll_ctl(ep, op, slots[i].fd, &ev);
}

static void release(int i) {
    if (slots[i].phase == FREE) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, slots[i].fd, NULL);
    close(slots[i].fd);
    slots[i].phase = FREE;
    active--;
}

static void start(int i) {
    slots[i].phase = FREE;
    if (started >= (mode == M_MSG ? nslots : count) || now() > deadline) return;
    started++;
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) { errors++; return; }
    if (addr.ss_family == AF_INET) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    slots[i] = (struct slot){.fd = fd, .phase = CONNECTING, .got = 0, .t0 = now()};
    active++;
    if (connect(fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        errors++;
        close(fd);
        slots[i].phase = FREE;
        active--;
        return;
    }
    watch(i, EPOLLOUT, EPOLL_CTL_ADD);
}

static void fail(int i) {
    errors++;
    release(i);
    if (mode == M_CONN) start(i);
}

static long msent;

static void send_message(int i) {
    if (msent >= count || now() > deadline) { release(i); return; }
    msent++;
    slots[i].got = 0;
    slots[i].t0 = now();
    if (send(slots[i].fd, msgbuf, size, MSG_NOSIGNAL) != size) fail(i);
}

static void record(double t0) {
    double us = (now() - t0) * 1e6;
    if (nlat < count) lat[nlat++] = us > 4e9 ? 4000000000u : (uint32_t)us;
}

static void on_writable(int i) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(slots[i].fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err || send(slots[i].fd, hello, hello_len, MSG_NOSIGNAL) != hello_len) { fail(i); return; }
    slots[i].phase = AWAIT_REPLY;
    watch(i, EPOLLIN, EPOLL_CTL_MOD);
}

static void on_readable(int i) {
    struct slot *s = &slots[i];
    ssize_t n = recv(s->fd, msgbuf, sizeof msgbuf, 0);
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) { if (s->phase == HOLDING) { errors++; release(i); } else fail(i); return; }
    if (s->phase == AWAIT_REPLY && s->got == 0 && msgbuf[0] != 'O') { fail(i); return; } /* not "OK" */
    s->got += n;
    if (s->phase == AWAIT_REPLY && s->got >= 2) {
        if (mode == M_CONN) {
            record(s->t0);
            done++;
            release(i);
            start(i);
        } else if (mode == M_IDLE) {
            done++;
            s->phase = HOLDING;
        } else {
            s->phase = AWAIT_ECHO;
            send_message(i);
        }
    } else if (s->phase == AWAIT_ECHO && s->got >= size) {
        record(s->t0);
        done++;
        send_message(i);
    }
}

static void run_epoll(void) {
    struct epoll_event evs[512];
    for (int i = 0; i < nslots; i++) start(i);
    while (active > 0 && now() <= deadline) {
        if (mode == M_IDLE && done + errors >= count) return;
        int n = epoll_wait(ep, evs, 512, 100);
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32;
            if (slots[i].phase == CONNECTING) on_writable(i);
            else if (slots[i].phase != FREE) on_readable(i);
        }
    }
}

static void hold_until_stdin_closes(void) {
    printf("{\"ready\": %ld, \"errors\": %ld}\n", done, errors);
    fflush(stdout);
    double left = deadline - now();
    struct pollfd p = {.fd = 0, .events = POLLIN};
    char b[64];
    while (left > 0 && poll(&p, 1, (int)(left * 1000) + 1) > 0 && read(0, b, sizeof b) > 0)
        left = deadline - now();
}

static long run_bulk(void) {
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char *buf = malloc(read_size);
    long total = 0;
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, addrlen) < 0 ||
        send(fd, hello, hello_len, MSG_NOSIGNAL) != hello_len) { errors++; free(buf); return 0; }
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t n = recv(fd, buf, read_size, 0); /* the first bytes start the clock */
    t_begin = now();
    while (n > 0 && total < size && now() <= deadline) {
        total += n;
        n = recv(fd, buf, read_size, 0);
    }
    if (n < 0) errors++;
    close(fd);
    free(buf);
    return total;
}

static int cmp(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) { return nlat ? (double)lat[(long)((nlat - 1) * p)] : -1.0; }

int main(int argc, char **argv) {
    const char *modes[] = {"conn", "msg", "idle", "bulk"};
    mode = -1;
    for (int m = 0; argc >= 7 && m < 4; m++) if (!strcmp(argv[1], modes[m])) mode = m;
    if (mode < 0 || parse_target(argv[2]) < 0 || read_file(argv[3]) < 0) {
        fprintf(stderr, "usage: loadgen conn|msg|idle|bulk tcp:IP:PORT|unix:PATH HELLO_FILE "
                        "CONCURRENCY COUNT SECONDS [SIZE [READ_SIZE]]\n");
        return 2;
    }
    nslots = atoi(argv[4]);
    count = atol(argv[5]);
    seconds = atof(argv[6]);
    size = argc > 7 ? atol(argv[7]) : 64;
    if (argc > 8) read_size = atol(argv[8]);
    if (nslots < 1 || count < 1 || seconds <= 0 || size < 1 || (mode == M_MSG && size > 65536) ||
        read_size < 1 || read_size > (64L << 20)) return 2;
    if (mode == M_IDLE && nslots > count) nslots = count;
    struct rlimit rl = {262144, 262144};
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) { rl.rlim_cur = rl.rlim_max = 65536; setrlimit(RLIMIT_NOFILE, &rl); }
    memset(msgbuf, 'm', sizeof msgbuf);
    t_begin = now();
    deadline = t_begin + seconds;
    long bytes = 0;
    if (mode == M_BULK) {
        bytes = run_bulk();
        done = bytes > 0;
    } else {
        lat = calloc(count, sizeof *lat);
        slots = calloc(mode == M_IDLE ? count : nslots, sizeof *slots);
        ep = epoll_create1(EPOLL_CLOEXEC);
        if (mode == M_IDLE) {
            /* open COUNT connections, at most CONCURRENCY handshaking at once */
            long opened = 0;
            int in_flight = nslots;
            nslots = count;
            for (long i = 0; i < count; i++) slots[i].phase = FREE;
            while (opened < count && now() <= deadline) {
                long batch = opened + in_flight > count ? count - opened : in_flight;
                for (long i = opened; i < opened + batch; i++) start(i);
                opened += batch;
                while (done + errors < opened && now() <= deadline) {
                    struct epoll_event evs[512];
                    int n = epoll_wait(ep, evs, 512, 100);
                    for (int k = 0; k < n; k++) {
                        int i = evs[k].data.u32;
                        if (slots[i].phase == CONNECTING) on_writable(i);
                        else if (slots[i].phase == AWAIT_REPLY) on_readable(i);
                    }
                }
            }
            hold_until_stdin_closes();
        } else {
            run_epoll();
        }
    }
    double elapsed = now() - t_begin;
    qsort(lat, nlat, sizeof *lat, cmp);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("{\"mode\": \"%s\", \"ops\": %ld, \"errors\": %ld, \"seconds\": %.6f, \"bytes\": %ld, "
           "\"p50_us\": %.0f, \"p99_us\": %.0f, \"cpu_s\": %.6f}\n",
           modes[mode], done, errors, elapsed, bytes, pct(0.50), pct(0.99), cpu);
    return 0;
}
