/* A small fast backend for perf/bench.py: an epoll server on a Unix socket.
 *
 *   backend PATH MODE [WRITE_SIZE]     MODE is echo, source or http
 *
 * Every connection first sends one TLS record (the ClientHello); its length is read
 * from the 5-byte record header.  Then:
 *   echo    reply "OK" (2 bytes), then echo every byte back (ping-pong messages, idle)
 *   source  stream bytes to the client until it closes (bulk download), by send()s of
 *           WRITE_SIZE bytes (default 262144; non-blocking, so a send may take less)
 * Mode http skips the hello: it answers every request head (each "\r\n\r\n") with a
 * tiny keep-alive "200 OK" (bodiless GET requests only, as wrk sends); a head that says
 * "Connection: close" gets the answer with "Connection: close", then the backend shuts
 * its side, as HTTP servers do (RFC 9112 section 9.6).
 * Runs until SIGTERM/SIGINT.  Single-threaded, non-blocking, level-triggered.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXFD 131072
#define BUF 65536

struct conn {
    int hdr_have;            /* header bytes seen, 0..5 */
    unsigned char hdr[5];
    int body_left;           /* bytes of the hello record still to read */
    int hello_done;
    char *pending;           /* unsent echo bytes */
    int pending_len, pending_off;
    int close_have;          /* http: bytes of "connection: close" matched in this head */
    int close_after;         /* http: shut our side once the pending answer is out */
};

static struct conn *conns;
static int source_mode, http_mode;
static const char http_reply[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nOK";
static const char http_close_reply[] =
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nOK";
static const char close_field[] = "connection: close";
static volatile sig_atomic_t stop;
static char *srcbuf;
static size_t srcsize = 262144;

static void on_signal(int sig) { (void)sig; stop = 1; }

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(conns[fd].pending);
    memset(&conns[fd], 0, sizeof conns[fd]);
}

static void watch(int ep, int fd, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(ep, op, fd, &ev);
}

/* Consume hello bytes from buf; return how many bytes of buf belong to the hello. */
static int eat_hello(struct conn *c, const unsigned char *buf, int n) {
    int used = 0;
    while (used < n && c->hdr_have < 5) c->hdr[c->hdr_have++] = buf[used++];
    if (c->hdr_have < 5) return used;
    if (c->body_left < 0) c->body_left = (c->hdr[3] << 8) | c->hdr[4];
    int take = n - used < c->body_left ? n - used : c->body_left;
    c->body_left -= take;
    used += take;
    if (c->body_left == 0) c->hello_done = 1;
    return used;
}

/* Write all of data or keep the rest pending; return -1 on a fatal error. */
static int send_or_keep(int ep, int fd, const char *data, int n) {
    struct conn *c = &conns[fd];
    if (c->pending) { /* keep the order: append behind what is already waiting */
        c->pending = realloc(c->pending, c->pending_len + n);
        memcpy(c->pending + c->pending_len, data, n);
        c->pending_len += n;
        return 0;
    }
    ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN) return -1;
        w = 0;
    }
    if (w < n) {
        c->pending = malloc(n - w);
        memcpy(c->pending, data + w, n - w);
        c->pending_len = n - w;
        c->pending_off = 0;
        watch(ep, fd, EPOLLOUT, EPOLL_CTL_MOD);
    }
    return 0;
}

static int flush_pending(int ep, int fd) {
    struct conn *c = &conns[fd];
    while (c->pending_off < c->pending_len) {
        ssize_t w = send(fd, c->pending + c->pending_off, c->pending_len - c->pending_off, MSG_NOSIGNAL);
        if (w < 0) return errno == EAGAIN ? 0 : -1;
        c->pending_off += w;
    }
    free(c->pending);
    c->pending = NULL;
    c->pending_len = c->pending_off = 0;
    watch(ep, fd, EPOLLIN, EPOLL_CTL_MOD);
    if (c->close_after) shutdown(fd, SHUT_WR);
    return 0;
}

static int pump_source(int fd) {
    for (int i = 0; i < 64; i++) {
        ssize_t w = send(fd, srcbuf, srcsize, MSG_NOSIGNAL);
        if (w < 0) return errno == EAGAIN ? 0 : -1;
    }
    return 0;
}

/* Reply once per end of request head; hdr_have is how much of "\r\n\r\n" matched. */
static int answer_requests(int ep, int fd, const unsigned char *buf, int n) {
    static const char end[] = "\r\n\r\n";
    struct conn *c = &conns[fd];
    for (int i = 0; i < n; i++) {
        unsigned char lower = buf[i] >= 'A' && buf[i] <= 'Z' ? buf[i] + 32 : buf[i];
        if (c->close_have < (int)sizeof close_field - 1)
            c->close_have = lower == (unsigned char)close_field[c->close_have] ? c->close_have + 1 : (lower == 'c');
        c->hdr_have = buf[i] == (unsigned char)end[c->hdr_have] ? c->hdr_have + 1 : (buf[i] == '\r');
        if (c->hdr_have == 4) {
            int closing = c->close_have == (int)sizeof close_field - 1;
            c->hdr_have = c->close_have = 0;
            if (!closing) {
                if (send_or_keep(ep, fd, http_reply, sizeof http_reply - 1) < 0) return -1;
                continue;
            }
            c->close_after = 1;
            if (send_or_keep(ep, fd, http_close_reply, sizeof http_close_reply - 1) < 0) return -1;
            if (!c->pending) shutdown(fd, SHUT_WR);
            return 0;  /* nothing more is answered on this connection */
        }
    }
    return 0;
}

static int on_readable(int ep, int fd) {
    static unsigned char buf[BUF];
    struct conn *c = &conns[fd];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n == 0) return -1;
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    if (http_mode) return answer_requests(ep, fd, buf, (int)n);
    int off = 0;
    if (!c->hello_done) {
        off = eat_hello(c, buf, (int)n);
        if (!c->hello_done) return 0;
        if (source_mode) {
            watch(ep, fd, EPOLLIN | EPOLLOUT, EPOLL_CTL_MOD);
            return pump_source(fd);
        }
        if (send_or_keep(ep, fd, "OK", 2) < 0) return -1;
    }
    if (source_mode || off >= n) return 0;
    return send_or_keep(ep, fd, (char *)buf + off, (int)n - off);
}

static int listen_on(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (s < 0 || strlen(path) >= sizeof a.sun_path) return -1;
    strcpy(a.sun_path, path);
    unlink(path);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4096) < 0) return -1;
    chmod(path, 0777); /* nginx's workers and sniproxy run unprivileged */
    return s;
}

static void accept_all(int ep, int ls) {
    for (;;) {
        int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (fd >= MAXFD) { close(fd); continue; }
        memset(&conns[fd], 0, sizeof conns[fd]);
        conns[fd].body_left = -1;
        watch(ep, fd, EPOLLIN, EPOLL_CTL_ADD);
    }
}

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4 || (strcmp(argv[2], "echo") && strcmp(argv[2], "source") && strcmp(argv[2], "http"))) {
        fprintf(stderr, "usage: backend PATH echo|source|http [WRITE_SIZE]\n");
        return 2;
    }
    if (argc == 4) srcsize = strtoul(argv[3], NULL, 10);
    if (srcsize < 1 || srcsize > (64u << 20)) return 2;
    source_mode = !strcmp(argv[2], "source");
    http_mode = !strcmp(argv[2], "http");
    srcbuf = malloc(srcsize);
    memset(srcbuf, 'x', srcsize);
    struct rlimit rl = {MAXFD, MAXFD};
    setrlimit(RLIMIT_NOFILE, &rl);
    conns = calloc(MAXFD, sizeof *conns);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    int ls = listen_on(argv[1]);
    if (ls < 0) { perror("backend: listen"); return 1; }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    watch(ep, ls, EPOLLIN, EPOLL_CTL_ADD);
    struct epoll_event evs[256];
    while (!stop) {
        int n = epoll_wait(ep, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) { accept_all(ep, ls); continue; }
            int bad = 0;
            if (evs[i].events & EPOLLOUT)
                bad = source_mode && conns[fd].hello_done ? pump_source(fd) : flush_pending(ep, fd);
            if (!bad && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !conns[fd].pending)
                bad = on_readable(ep, fd);
            if (bad) drop(ep, fd);
        }
    }
    unlink(argv[1]);
    return 0;
}
