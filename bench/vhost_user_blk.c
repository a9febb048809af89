/*
 * A minimal vhost-user front-end that plays a guest's virtio-blk driver, for
 * benchmarking vhost-user block back-ends (bench/vhost_user_blk.py runs it).
 *
 * Written from the vhost-user protocol specification (QEMU docs/interop/vhost-user)
 * and virtio 1.x (2.7 split virtqueues, 5.2 block device). One queue, split ring,
 * no EVENT_IDX, no indirect descriptors. Guest memory is one sealed memfd; guest
 * address 0 is the start of the mapping.
 *
 *   vhost_user_blk SOCKET [-m randread|randwrite|seqread|seqwrite] [-q QD]
 *                  [-t SECONDS] [-w WARMUP_SECONDS] [-b BLOCK_BYTES] [-s DISK_BYTES]
 *                  [-S SEED] [-V IMAGE]
 *
 * -V IMAGE checks every completed request against the image file itself (a read's
 * data equals the file's bytes there; after a write, the file holds what was
 * written): a correctness check of the back-end, not for timing runs.
 *
 * Prints one line: mode=... bs=... qd=... ios=N seconds=S iops=X mbps=Y
 * wakeups=W kicks=K (completions per wake-up = ios / wakeups over the whole run).
 * Any error is one message on stderr and exit status 1; nothing waits more than 10 s.
 *
 *   gcc -O2 -Wall -o vhost_user_blk bench/vhost_user_blk.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* vhost-user requests */
enum {
	VU_GET_FEATURES = 1,
	VU_SET_FEATURES = 2,
	VU_SET_OWNER = 3,
	VU_SET_MEM_TABLE = 5,
	VU_SET_VRING_NUM = 8,
	VU_SET_VRING_ADDR = 9,
	VU_SET_VRING_BASE = 10,
	VU_SET_VRING_KICK = 12,
	VU_SET_VRING_CALL = 13,
	VU_GET_PROTOCOL_FEATURES = 15,
	VU_SET_PROTOCOL_FEATURES = 16,
	VU_SET_VRING_ENABLE = 18,
	VU_GET_CONFIG = 24,
};

#define VU_VERSION 0x1u
#define VU_FLAG_REPLY (1u << 2)
#define VU_FLAG_NEED_REPLY (1u << 3)
#define VU_HEADER_SIZE 12
#define VU_MAX_PAYLOAD 256

#define F_PROTOCOL_FEATURES (1ull << 30)
#define F_VERSION_1 (1ull << 32)
#define PF_MQ (1ull << 0)
#define PF_REPLY_ACK (1ull << 3)
#define PF_CONFIG (1ull << 9)

/* split virtqueue */
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define USED_F_NO_NOTIFY 1

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vq_used_elem {
	uint32_t id;
	uint32_t len;
};

/* virtio-blk */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define SECTOR_SIZE 512

struct blk_header {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

#define RING_NUM 256	/* descriptors; 3 per request */
#define TIMEOUT_MS 10000

/* Guest memory layout (offsets = guest addresses). */
#define OFF_DESC 0x0000
#define OFF_AVAIL 0x1000
#define OFF_USED 0x2000
#define OFF_HEADERS 0x3000
#define OFF_STATUS 0x4000
#define OFF_DATA 0x10000

static const char *prog = "vhost_user_blk";

static void die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* -- the vhost-user connection ------------------------------------------------ */

static int sock = -1;
static uint64_t protocol;	/* negotiated protocol features */

static const char *req_name(uint32_t req)
{
	switch (req) {
	case VU_GET_FEATURES: return "GET_FEATURES";
	case VU_SET_FEATURES: return "SET_FEATURES";
	case VU_SET_OWNER: return "SET_OWNER";
	case VU_SET_MEM_TABLE: return "SET_MEM_TABLE";
	case VU_SET_VRING_NUM: return "SET_VRING_NUM";
	case VU_SET_VRING_ADDR: return "SET_VRING_ADDR";
	case VU_SET_VRING_BASE: return "SET_VRING_BASE";
	case VU_SET_VRING_KICK: return "SET_VRING_KICK";
	case VU_SET_VRING_CALL: return "SET_VRING_CALL";
	case VU_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
	case VU_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
	case VU_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
	case VU_GET_CONFIG: return "GET_CONFIG";
	}
	return "?";
}

static void connect_socket(const char *path)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = TIMEOUT_MS / 1000 };
	double deadline = now() + TIMEOUT_MS / 1000.0;

	if (strlen(path) >= sizeof(addr.sun_path))
		die("socket path %s is too long", path);
	strcpy(addr.sun_path, path);
	for (;;) {
		sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (sock < 0)
			die("socket: %s", strerror(errno));
		if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) == 0)
			break;
		if ((errno != ENOENT && errno != ECONNREFUSED) || now() > deadline)
			die("connect %s: %s", path, strerror(errno));
		close(sock);
		usleep(10000);
	}
	/* a back-end that never answers is an error after 10 s, not a hang */
	if (setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
	    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
		die("setsockopt: %s", strerror(errno));
}

static void vu_send(uint32_t req, uint32_t flags, const void *payload, uint32_t size,
		    const int *fds, int nfds)
{
	uint8_t hdr[VU_HEADER_SIZE];
	uint32_t words[3] = { req, VU_VERSION | flags, size };
	struct iovec iov[2] = {
		{ .iov_base = hdr, .iov_len = VU_HEADER_SIZE },
		{ .iov_base = (void *)payload, .iov_len = size },
	};
	union {
		char buf[CMSG_SPACE(4 * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct msghdr msg = { .msg_iov = iov, .msg_iovlen = size ? 2 : 1 };
	ssize_t n;

	memcpy(hdr, words, sizeof(hdr));
	if (nfds) {
		struct cmsghdr *cmsg;

		memset(&control, 0, sizeof(control));
		msg.msg_control = control.buf;
		msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
		cmsg = CMSG_FIRSTHDR(&msg);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
		memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
	}
	n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	if (n < 0)
		die("sending %s: %s", req_name(req), strerror(errno));
	if ((size_t)n != VU_HEADER_SIZE + size)
		die("sending %s: short write (%zd of %u bytes)", req_name(req), n,
		    VU_HEADER_SIZE + size);
}

static void recv_exact(void *buf, size_t size, uint32_t req)
{
	size_t got = 0;

	while (got < size) {
		ssize_t n = recv(sock, (char *)buf + got, size - got, 0);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			die("no reply to %s within %d s", req_name(req), TIMEOUT_MS / 1000);
		if (n < 0)
			die("reading the reply to %s: %s", req_name(req), strerror(errno));
		if (n == 0)
			die("the back-end closed the connection (waiting for the reply to %s)",
			    req_name(req));
		got += n;
	}
}

/* Reads the reply to `req`, whose payload must be exactly `size` bytes. */
static void vu_reply(uint32_t req, void *payload, uint32_t size)
{
	uint32_t hdr[3];

	recv_exact(hdr, sizeof(hdr), req);
	if (hdr[0] != req)
		die("reply to %s has request code %u", req_name(req), hdr[0]);
	if ((hdr[1] & 0x3) != VU_VERSION || !(hdr[1] & VU_FLAG_REPLY))
		die("reply to %s has flags %#x (expected version 1 and REPLY)", req_name(req),
		    hdr[1]);
	if (hdr[2] != size) {
		if (hdr[2] > VU_MAX_PAYLOAD)
			die("reply to %s: payload of %u bytes", req_name(req), hdr[2]);
		/* read it anyway, for the message */
		uint8_t junk[VU_MAX_PAYLOAD];
		recv_exact(junk, hdr[2], req);
		die("reply to %s: payload of %u bytes, expected %u (the back-end failed it?)",
		    req_name(req), hdr[2], size);
	}
	recv_exact(payload, size, req);
}

static uint64_t vu_get_u64(uint32_t req)
{
	uint64_t value;

	vu_send(req, 0, NULL, 0, NULL, 0);
	vu_reply(req, &value, sizeof(value));
	return value;
}

/* A request without reply data: with REPLY_ACK, ask for the ack and check it. */
static void vu_set(uint32_t req, const void *payload, uint32_t size, const int *fds, int nfds)
{
	int ack = (protocol & PF_REPLY_ACK) != 0;

	vu_send(req, ack ? VU_FLAG_NEED_REPLY : 0, payload, size, fds, nfds);
	if (ack) {
		uint64_t status;

		vu_reply(req, &status, sizeof(status));
		if (status)
			die("the back-end refused %s (status %llu)", req_name(req),
			    (unsigned long long)status);
	}
}

static void vu_set_u64(uint32_t req, uint64_t value)
{
	vu_set(req, &value, sizeof(value), NULL, 0);
}

static void vu_vring_state(uint32_t req, uint32_t index, uint32_t num)
{
	uint32_t state[2] = { index, num };

	vu_set(req, state, sizeof(state), NULL, 0);
}

static void vu_vring_fd(uint32_t req, uint32_t index, int fd)
{
	uint64_t value = index;

	vu_set(req, &value, sizeof(value), &fd, 1);
}

/* -- the workload ------------------------------------------------------------- */

enum mode { RANDREAD, RANDWRITE, SEQREAD, SEQWRITE };
static const char *mode_names[] = { "randread", "randwrite", "seqread", "seqwrite" };

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	/* xorshift64* */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: %s SOCKET [-m randread|randwrite|seqread|seqwrite] [-q QD] "
		"[-t SECONDS] [-w WARMUP] [-b BLOCK_BYTES] [-s DISK_BYTES] [-S SEED] [-V IMAGE]\n",
		prog);
	exit(1);
}

int main(int argc, char **argv)
{
	enum mode mode = RANDREAD;
	unsigned qd = 32, bs = 0;
	double seconds = 5, warmup = 1;
	uint64_t disk_bytes = 0;
	const char *verify_path = NULL;
	int opt, i;

	while ((opt = getopt(argc, argv, "m:q:t:w:b:s:S:V:h")) != -1) {
		switch (opt) {
		case 'm':
			for (i = 0; i < 4 && strcmp(optarg, mode_names[i]); i++)
				;
			if (i == 4)
				die("unknown mode %s", optarg);
			mode = i;
			break;
		case 'q': qd = strtoul(optarg, NULL, 0); break;
		case 't': seconds = strtod(optarg, NULL); break;
		case 'w': warmup = strtod(optarg, NULL); break;
		case 'b': bs = strtoul(optarg, NULL, 0); break;
		case 's': disk_bytes = strtoull(optarg, NULL, 0); break;
		case 'S': rng_state = strtoull(optarg, NULL, 0) | 1; break;
		case 'V': verify_path = optarg; break;
		default: usage();
		}
	}
	if (optind != argc - 1)
		usage();
	int sequential = mode == SEQREAD || mode == SEQWRITE;
	int writing = mode == RANDWRITE || mode == SEQWRITE;
	if (!bs)
		bs = sequential ? 128 << 10 : 4096;
	if (qd < 1 || 3 * qd > RING_NUM)
		die("queue depth %u: 1 to %u (3 descriptors each in a %u-entry ring)", qd,
		    RING_NUM / 3, RING_NUM);
	if (bs < SECTOR_SIZE || bs % 4096 || bs > (4u << 20))
		die("block size %u: a multiple of 4096 up to 4 MiB", bs);
	if (!(seconds > 0) || warmup < 0)
		die("bad --seconds/--warmup");

	/* guest memory: a sealed memfd, mapped shared */
	size_t mem_size = OFF_DATA + (size_t)qd * bs;
	mem_size = (mem_size + 0x1fffff) & ~(size_t)0x1fffff;
	int memfd = memfd_create("vubench-guest", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (memfd < 0)
		die("memfd_create: %s", strerror(errno));
	if (ftruncate(memfd, mem_size) < 0)
		die("ftruncate: %s", strerror(errno));
	if (fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0)
		die("F_ADD_SEALS: %s", strerror(errno));
	uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		die("mmap: %s", strerror(errno));

	volatile struct vq_desc *desc = (void *)(mem + OFF_DESC);
	volatile uint16_t *avail = (void *)(mem + OFF_AVAIL);	/* flags, idx, ring[] */
	uint16_t *avail_idx_p = (uint16_t *)(mem + OFF_AVAIL + 2);
	volatile uint16_t *used_flags = (void *)(mem + OFF_USED);
	uint16_t *used_idx_p = (uint16_t *)(mem + OFF_USED + 2);
	volatile struct vq_used_elem *used_ring = (void *)(mem + OFF_USED + 4);
	volatile struct blk_header *headers = (void *)(mem + OFF_HEADERS);
	volatile uint8_t *status = mem + OFF_STATUS;

	int verify_fd = -1;
	uint8_t *verify_buf = NULL;
	if (verify_path) {
		verify_fd = open(verify_path, O_RDONLY | O_CLOEXEC);
		verify_buf = malloc(bs);
		if (verify_fd < 0 || !verify_buf)
			die("-V %s: %s", verify_path, strerror(errno));
	}

	int kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	int call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (kick < 0 || call < 0)
		die("eventfd: %s", strerror(errno));

	/* -- the handshake -- */
	connect_socket(argv[optind]);
	uint64_t features = vu_get_u64(VU_GET_FEATURES);
	if (!(features & F_VERSION_1))
		die("the back-end does not offer VIRTIO_F_VERSION_1 (features %#llx)",
		    (unsigned long long)features);
	vu_set(VU_SET_OWNER, NULL, 0, NULL, 0);
	if (features & F_PROTOCOL_FEATURES) {
		uint64_t offered = vu_get_u64(VU_GET_PROTOCOL_FEATURES);
		uint64_t want = offered & (PF_REPLY_ACK | PF_MQ | PF_CONFIG);

		vu_set_u64(VU_SET_PROTOCOL_FEATURES, want);	/* acks from the next one on */
		protocol = want;
	}
	if (protocol & PF_CONFIG) {
		/* capacity: the first 8 bytes of virtio_blk_config */
		uint8_t cfg[12 + 8] = { 0 }, reply[12 + 8];
		uint32_t hdr[3] = { 0, 8, 0 };	/* offset, size, flags */
		uint64_t capacity;

		memcpy(cfg, hdr, sizeof(hdr));
		vu_send(VU_GET_CONFIG, 0, cfg, sizeof(cfg), NULL, 0);
		vu_reply(VU_GET_CONFIG, reply, sizeof(reply));
		memcpy(&capacity, reply + 12, 8);
		if (disk_bytes && disk_bytes != capacity * SECTOR_SIZE)
			die("the back-end says the disk is %llu bytes, -s says %llu",
			    (unsigned long long)capacity * SECTOR_SIZE,
			    (unsigned long long)disk_bytes);
		disk_bytes = capacity * SECTOR_SIZE;
	}
	if (!disk_bytes)
		die("the disk size is unknown: the back-end has no CONFIG; give -s BYTES");
	if (disk_bytes < (uint64_t)bs * qd)
		die("disk of %llu bytes is smaller than %u requests of %u bytes",
		    (unsigned long long)disk_bytes, qd, bs);
	vu_set_u64(VU_SET_FEATURES, F_VERSION_1 | (features & F_PROTOCOL_FEATURES));

	struct {
		uint32_t nregions, padding;
		uint64_t guest_addr, size, user_addr, mmap_offset;
	} table = { 1, 0, 0, mem_size, (uintptr_t)mem, 0 };
	vu_set(VU_SET_MEM_TABLE, &table, sizeof(table), &memfd, 1);

	struct {
		uint32_t index, flags;
		uint64_t desc, used, avail, log;
	} addr = { 0, 0, (uintptr_t)(mem + OFF_DESC), (uintptr_t)(mem + OFF_USED),
		   (uintptr_t)(mem + OFF_AVAIL), 0 };
	vu_vring_state(VU_SET_VRING_NUM, 0, RING_NUM);
	vu_set(VU_SET_VRING_ADDR, &addr, sizeof(addr), NULL, 0);
	vu_vring_state(VU_SET_VRING_BASE, 0, 0);
	vu_vring_fd(VU_SET_VRING_CALL, 0, call);
	vu_vring_fd(VU_SET_VRING_KICK, 0, kick);
	if (features & F_PROTOCOL_FEATURES)
		vu_vring_state(VU_SET_VRING_ENABLE, 0, 1);

	/* -- the requests: slot s owns descriptors 3s (header), 3s+1 (data), 3s+2 (status) -- */
	for (unsigned s = 0; s < qd; s++) {
		uint64_t data = OFF_DATA + (uint64_t)s * bs;

		desc[3 * s] = (struct vq_desc){ OFF_HEADERS + 16 * s, 16, DESC_F_NEXT, 3 * s + 1 };
		desc[3 * s + 1] = (struct vq_desc){ data, bs,
			(writing ? 0 : DESC_F_WRITE) | DESC_F_NEXT, 3 * s + 2 };
		desc[3 * s + 2] = (struct vq_desc){ OFF_STATUS + s, 1, DESC_F_WRITE, 0 };
		memset(mem + data, 0x5a, bs);
	}
	uint64_t blocks = disk_bytes / bs, position = 0;
	uint16_t next_avail = 0, last_used = 0;
	uint8_t *inflight = calloc(qd, 1);
	unsigned outstanding = 0;
	uint64_t wakeups = 0, kicks = 0, total = 0, measured = 0;

	if (!inflight)
		die("out of memory");
	/* queue one request in slot `s` (published by publish()) */
#define SUBMIT(s) do {								\
		uint64_t block = sequential ? position++ % blocks : rng() % blocks;	\
		headers[s] = (struct blk_header){ writing ? BLK_T_OUT : BLK_T_IN, 0,	\
			block * (bs / SECTOR_SIZE) };				\
		status[s] = 0xff;						\
		if (writing && verify_fd >= 0)	/* same block, same bytes */	\
			memcpy(mem + OFF_DATA + (size_t)(s) * bs, &block, 8);	\
		avail[2 + next_avail % RING_NUM] = 3 * (s);			\
		next_avail++;							\
		inflight[s] = 1;						\
		outstanding++;							\
	} while (0)

	for (unsigned s = 0; s < qd; s++)
		SUBMIT(s);
	/* publish: the ring entries before the index; the index before reading the
	 * device's NO_NOTIFY flag (virtio 2.7.13) */
#define PUBLISH() do {								\
		__atomic_store_n(avail_idx_p, next_avail, __ATOMIC_RELEASE);	\
		__atomic_thread_fence(__ATOMIC_SEQ_CST);			\
		if (!(*used_flags & USED_F_NO_NOTIFY)) {			\
			uint64_t one = 1;					\
			if (write(kick, &one, sizeof(one)) != sizeof(one))	\
				die("kick: %s", strerror(errno));		\
			kicks++;						\
		}								\
	} while (0)
	PUBLISH();

	double start = now(), t_measure = start + warmup, t_end = t_measure + seconds;
	double last_progress = start, measured_from = 0, measured_to = 0;
	int measuring = 0, stopping = 0;

	while (!stopping || outstanding) {
		uint16_t used_idx = __atomic_load_n(used_idx_p, __ATOMIC_ACQUIRE);
		double t;

		if (used_idx == last_used) {
			struct pollfd pfd[2] = { { .fd = call, .events = POLLIN },
						 { .fd = sock, .events = POLLIN } };
			int left = TIMEOUT_MS - (int)((now() - last_progress) * 1000);
			int n;

			if (left <= 0)
				die("no completion for %d s (%u requests outstanding)",
				    TIMEOUT_MS / 1000, outstanding);
			n = poll(pfd, 2, left);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				die("poll: %s", strerror(errno));
			if (pfd[1].revents)
				die("the back-end closed the connection (or sent an unexpected "
				    "message) with %u requests outstanding", outstanding);
			if (pfd[0].revents) {
				uint64_t count;

				if (read(call, &count, sizeof(count)) < 0 && errno != EAGAIN)
					die("reading the call eventfd: %s", strerror(errno));
				wakeups++;
			}
			continue;
		}
		if ((uint16_t)(used_idx - last_used) > outstanding)
			die("used index jumped from %u to %u with %u requests outstanding",
			    last_used, used_idx, outstanding);
		unsigned resubmitted = 0, done = 0;
		while (last_used != used_idx) {
			uint32_t id = used_ring[last_used % RING_NUM].id;
			unsigned s = id / 3;

			last_used++;
			if (id % 3 || s >= qd || !inflight[s])
				die("used ring returned descriptor %u, not the head of an "
				    "outstanding request", id);
			inflight[s] = 0;
			outstanding--;
			done++;
			if (status[s] != 0)
				die("request at sector %llu failed with status %u",
				    (unsigned long long)headers[s].sector, status[s]);
			if (verify_fd >= 0) {
				uint64_t off = headers[s].sector * SECTOR_SIZE;

				if (pread(verify_fd, verify_buf, bs, off) != (ssize_t)bs)
					die("-V: cannot read %u bytes at %llu", bs,
					    (unsigned long long)off);
				if (memcmp(verify_buf, mem + OFF_DATA + (size_t)s * bs, bs))
					die("%s at byte %llu: the guest buffer differs from the "
					    "image", writing ? "write" : "read",
					    (unsigned long long)off);
			}
			if (!stopping) {
				SUBMIT(s);
				resubmitted++;
			}
		}
		if (resubmitted)
			PUBLISH();
		total += done;
		t = now();
		last_progress = t;
		if (measuring)
			measured += done;
		if (!measuring && t >= t_measure) {
			measuring = 1;
			measured_from = t;
		} else if (measuring && !stopping && t >= t_end) {
			stopping = 1;
			measured_to = t;
		}
	}
	double elapsed = measured_to - measured_from;
	printf("mode=%s bs=%u qd=%u ios=%llu seconds=%.3f iops=%.0f mbps=%.1f "
	       "wakeups=%llu kicks=%llu total_ios=%llu\n",
	       mode_names[mode], bs, qd, (unsigned long long)measured, elapsed,
	       measured / elapsed, measured * (double)bs / elapsed / 1e6,
	       (unsigned long long)wakeups, (unsigned long long)kicks,
	       (unsigned long long)total);
	fflush(stdout);
	close(sock);
	return 0;
}
