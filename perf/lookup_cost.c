/* The kernel's price of each step of the proxies' per-connection backend lookup,
 * against a plain connect by path as sniproxy, nginx and haproxy make it; and of the
 * two ways to learn that a TCP listener's accept queue is empty.
 *
 *     lookup_cost HOSTS ROUNDS COUNT
 *
 * HOSTS holds app.example.test/tls-socket (bound and accepted here). Each step runs
 * COUNT times per round; one line per step: the median over ROUNDS of this thread's
 * CPU time (user + system, getrusage RUSAGE_THREAD) per step, in ns. An accepting
 * thread on the other CPU closes every connection, so a connect is a real one.
 * perf/lookup_cost.py builds and runs it.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/openat2.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#define ENTRY "app.example.test"
#define SOCKET ENTRY "/tls-socket"
#define MAX_ROUNDS 64

static int hosts, listener, tcp_listener; /* tcp_listener: non-blocking, nothing queued */

static double cpu_now(void) {
    struct rusage usage;
    getrusage(RUSAGE_THREAD, &usage);
    return usage.ru_utime.tv_sec + usage.ru_stime.tv_sec + (usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) * 1e-6;
}

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static void *accept_all(void *unused) {
    (void)unused;
    pin(1);
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd >= 0)
            close(fd);
    }
    return NULL;
}

static int beneath(const char *path, long flags) { /* as the proxies: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS */
    struct open_how how = {.flags = flags, .resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS};
    return syscall(SYS_openat2, hosts, path, &how, sizeof how);
}

static void connect_to(const char *path) {
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0); /* blocking: waits, not fails, on a full backlog */
    strcpy(address.sun_path, path);
    if (connect(fd, (struct sockaddr *)&address, sizeof address) < 0)
        perror(path), exit(1);
    close(fd);
}

static void entry_lstat(void) {
    struct stat status;
    fstatat(hosts, ENTRY, &status, AT_SYMLINK_NOFOLLOW);
}

static void socket_openat2_fstat_close(void) {
    struct stat status;
    int fd = beneath(SOCKET, O_PATH | O_CLOEXEC);
    fstatat(fd, "", &status, AT_EMPTY_PATH);
    close(fd);
}

static void two_absent_markers(void) {
    beneath(ENTRY "/send-proxy-v2", O_PATH | O_NOFOLLOW | O_CLOEXEC);
    beneath(ENTRY "/send-proxy-v1", O_PATH | O_NOFOLLOW | O_CLOEXEC);
}

static void connect_by_path(void) { connect_to(SOCKET); }

static void connect_through_proc(void) { /* the very inode checked: open it, connect through it */
    char path[32];
    int fd = beneath(SOCKET, O_PATH | O_CLOEXEC);
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    connect_to(path);
    close(fd);
}

static void connect_through_fd_directory(void) { /* the same, from /proc/self/fd as cwd */
    char path[16];
    int fd = beneath(SOCKET, O_PATH | O_CLOEXEC);
    snprintf(path, sizeof path, "%d", fd);
    connect_to(path);
    close(fd);
}

static void open_and_connect_by_path(void) { /* the same openat2 and close, then by path */
    int fd = beneath(SOCKET, O_PATH | O_CLOEXEC);
    connect_to(SOCKET);
    close(fd);
}

static void accept_finding_none(void) { /* allocates a socket and a file, then EAGAIN */
    accept4(tcp_listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

static void read_accept_queue(void) { /* tcpi_unacked: the accept queue's length */
    struct tcp_info info;
    socklen_t length = 32;
    getsockopt(tcp_listener, IPPROTO_TCP, TCP_INFO, &info, &length);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    static const struct {
        const char *name;
        void (*step)(void);
        const char *cwd; /* the step runs with this working directory; NULL: HOSTS */
    } steps[] = {
        {"lstat of the entry (its owner)", entry_lstat},
        {"openat2 + fstat + close of the socket", socket_openat2_fstat_close},
        {"two absent markers (openat2 each)", two_absent_markers},
        {"socket + connect by path + close", connect_by_path},
        {"openat2 + socket + connect by path + close x2", open_and_connect_by_path},
        {"openat2 + socket + connect /proc/self/fd/N + close x2", connect_through_proc},
        {"openat2 + socket + connect N (cwd /proc/self/fd) + close x2", connect_through_fd_directory,
         "/proc/self/fd"},
        {"accept4 on an empty TCP queue (EAGAIN)", accept_finding_none},
        {"getsockopt TCP_INFO of a TCP listener", read_accept_queue},
    };
    double seconds[MAX_ROUNDS];
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    struct sockaddr_in loopback = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    pthread_t thread;
    int rounds, count;
    if (argc != 4 || (rounds = atoi(argv[2])) < 1 || rounds > MAX_ROUNDS || (count = atoi(argv[3])) < 1)
        return fprintf(stderr, "usage: lookup_cost HOSTS ROUNDS(1-%d) COUNT\n", MAX_ROUNDS), 2;
    if (chdir(argv[1]) < 0 || (hosts = open(".", O_PATH | O_DIRECTORY | O_CLOEXEC)) < 0)
        return perror(argv[1]), 1;
    listener = socket(AF_UNIX, SOCK_STREAM, 0);
    strcpy(address.sun_path, SOCKET);
    unlink(SOCKET);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0 || listen(listener, 4096) < 0)
        return perror(SOCKET), 1;
    tcp_listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (bind(tcp_listener, (struct sockaddr *)&loopback, sizeof loopback) < 0 || listen(tcp_listener, 16) < 0)
        return perror("127.0.0.1"), 1;
    pthread_create(&thread, NULL, accept_all, NULL);
    pin(0);
    for (size_t s = 0; s < sizeof steps / sizeof steps[0]; s++) {
        if (steps[s].cwd && chdir(steps[s].cwd) < 0)
            return perror(steps[s].cwd), 1;
        for (int r = 0; r < rounds; r++) {
            double start = cpu_now();
            for (int i = 0; i < count; i++)
                steps[s].step();
            seconds[r] = cpu_now() - start;
        }
        if (fchdir(hosts) < 0)
            return perror(argv[1]), 1;
        qsort(seconds, rounds, sizeof seconds[0], by_value);
        printf("%7.0f ns  %s (%.0f-%.0f)\n", seconds[rounds / 2] / count * 1e9, steps[s].name,
               seconds[0] / count * 1e9, seconds[rounds - 1] / count * 1e9);
    }
    return 0;
}
