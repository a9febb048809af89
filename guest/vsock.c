/* vsock: a netcat for AF_VSOCK stream sockets, for the test guest (busybox has none).
 * Built statically by guest/initramfs.py and installed as /bin/vsock.
 *
 *   vsock [-s SECONDS] CID PORT              connect, relay stdin/stdout
 *   vsock [-s SECONDS] -l PORT               accept one connection, relay stdin/stdout
 *   vsock [-s SECONDS] -l PORT -e [-n N]     echo server (N connections, default unlimited)
 *
 * -s waits that long after the connection is made before reading from the socket, so
 * tests can make a peer that does not read for a while. Socket errors exit 1 with one
 * line on stderr; bad arguments exit 2 with the usage. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define BUF_SIZE (64 * 1024)

static const char usage_text[] =
    "usage: vsock [-s SECONDS] CID PORT\n"
    "       vsock [-s SECONDS] -l PORT\n"
    "       vsock [-s SECONDS] -l PORT -e [-n N]\n";

static char in_buf[BUF_SIZE], out_buf[BUF_SIZE];

static void usage(void) { fputs(usage_text, stderr); exit(2); }

static void die(const char *what) {
    fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* A whole unsigned number or the usage: "12x" or "" must not quietly become 12 or 0. */
static unsigned long number(const char *s, unsigned long max) {
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (*s < '0' || *s > '9' || *end || errno || v > max) usage();
    return v;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static ssize_t read_retry(int fd, void *buf, size_t n) {
    ssize_t r;
    do r = read(fd, buf, n); while (r < 0 && errno == EINTR);
    return r;
}

/* Blocking writes of all of buf (stdout, the echo child): partial writes and EINTR retry. */
static void write_all(int fd, const char *buf, size_t n, const char *what) {
    while (n > 0) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) die(what);
        buf += w;
        n -= w;
    }
}

/* stdin -> socket and socket -> stdout at once until the peer closes. The socket is
 * non-blocking and stdin is read only once its last chunk is sent, so a peer that
 * writes back before reading on (an echo server) cannot deadlock us on a full buffer. */
static void relay(int sock, double delay) {
    size_t pending = 0, sent = 0;  /* in_buf[sent..pending) still goes to the socket */
    int stdin_open = 1;
    double start_reading = now() + delay;
    if (fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK) < 0) die("fcntl");
    for (;;) {
        double left = start_reading - now();  /* of the -s delay */
        int reading = left <= 0;
        struct pollfd fds[2] = {
            {.fd = stdin_open && pending == 0 ? 0 : -1, .events = POLLIN},
            {.fd = sock, .events = (reading ? POLLIN : 0) | (pending ? POLLOUT : 0)},
        };
        /* While -s holds reading off and nothing waits to be sent, the socket is left out:
         * a hung-up socket would otherwise wake poll over and over. */
        if (!fds[1].events) fds[1].fd = -1;
        int timeout = reading ? -1 : (int)(left * 1000) + 1;
        if (poll(fds, 2, timeout) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (fds[0].revents) {
            ssize_t r = read_retry(0, in_buf, sizeof in_buf);
            if (r < 0) die("read stdin");
            if (r == 0) {
                stdin_open = 0;
                if (shutdown(sock, SHUT_WR) < 0) die("shutdown");
            }
            pending = r > 0 ? r : 0;
            sent = 0;
        }
        if (pending && (fds[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
            ssize_t w = write(sock, in_buf + sent, pending - sent);
            if (w < 0 && errno != EINTR && errno != EAGAIN) die("write socket");
            if (w > 0 && (sent += w) == pending) pending = sent = 0;
        }
        if (reading && (fds[1].revents & (POLLIN | POLLERR | POLLHUP))) {
            ssize_t r = read_retry(sock, out_buf, sizeof out_buf);
            if (r < 0 && errno != EAGAIN) die("read socket");
            if (r == 0) return;  /* the peer closed its side: done */
            if (r > 0) write_all(1, out_buf, r, "write stdout");
        }
    }
}

static void sleep_seconds(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {}
}

/* One echo connection, in its own process: everything read goes back; at the peer's
 * half-close our side closes too, which is what tells the peer the echo is complete. */
static void echo(int conn, double delay) {
    sleep_seconds(delay);
    for (;;) {
        ssize_t r = read_retry(conn, in_buf, sizeof in_buf);
        if (r < 0) die("read socket");
        if (r == 0) break;
        write_all(conn, in_buf, r, "write socket");
    }
    if (shutdown(conn, SHUT_WR) < 0) die("shutdown");
    exit(0);
}

static int accept_retry(int listener) {
    int conn;
    do conn = accept(listener, NULL, NULL); while (conn < 0 && errno == EINTR);
    if (conn < 0) die("accept");
    return conn;
}

int main(int argc, char **argv) {
    int listen_mode = 0, echo_mode = 0, opt;
    unsigned long count = 0;  /* echo connections to serve; 0 is unlimited */
    double delay = 0;
    char *end;
    opterr = 0;  /* the usage alone says what is wrong */
    while ((opt = getopt(argc, argv, "les:n:")) != -1) {
        switch (opt) {
        case 'l': listen_mode = 1; break;
        case 'e': echo_mode = 1; break;
        case 'n': count = number(optarg, 1UL << 31); if (!count) usage(); break;
        case 's':
            delay = strtod(optarg, &end);
            if (!*optarg || *end || !(delay >= 0 && delay < 1e6)) usage();
            break;
        default: usage();
        }
    }
    int args = argc - optind;
    if (listen_mode ? args != 1 : (args != 2 || echo_mode)) usage();
    if (count && !echo_mode) usage();
    /* A peer that goes away must be a reported error (EPIPE), not a silent death. */
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_vm addr = {.svm_family = AF_VSOCK};
    int sock = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (sock < 0) die("socket");
    if (!listen_mode) {
        addr.svm_cid = number(argv[optind], 0xffffffffUL);
        addr.svm_port = number(argv[optind + 1], 0xffffffffUL);
        if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
            fprintf(stderr, "vsock: connect %s:%s: %s\n", argv[optind], argv[optind + 1],
                    strerror(errno));
            return 1;
        }
        relay(sock, delay);
        return 0;
    }

    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = number(argv[optind], 0xffffffffUL);
    if (bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(sock, 16) < 0) die("listen");
    fputs("listening\n", stderr);  /* tests wait for this line before connecting */
    if (!echo_mode) {
        int conn = accept_retry(sock);
        close(sock);
        relay(conn, delay);
        return 0;
    }

    /* Unlimited: the kernel reaps the children. Counted: we wait for them at the end, so
     * exiting means every connection was served, and a failed child fails us. */
    if (!count) signal(SIGCHLD, SIG_IGN);
    for (unsigned long served = 0; !count || served < count; served++) {
        int conn = accept_retry(sock);
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            close(sock);
            echo(conn, delay);
        }
        close(conn);
    }
    close(sock);
    int status, failed = 0;
    for (;;) {
        if (wait(&status) < 0) {
            if (errno == EINTR) continue;
            break;  /* ECHILD: all served */
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status)) failed = 1;
    }
    return failed;
}
