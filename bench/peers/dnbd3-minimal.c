/*
 * dnbd3-minimal: a deliberately minimal DNBD3 server in C, used only as a
 * benchmark peer. It serves one image file with one blocking thread per
 * connection (the reference server's model) and implements just
 * SELECT_IMAGE, GET_BLOCK (sendfile) and KEEPALIVE, without any checks a
 * real server needs. Written from ../../../shared/spec/dnbd3-protocol.md;
 * it measures what this machine's kernel allows, so the benchmark can
 * report dnbd3-server as a ratio against it.
 *
 * usage: dnbd3-minimal PORT IMAGE-NAME FILE
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static int img_fd;
static uint64_t img_size;
static const char *img_name;

static int readall(int s, void *buf, size_t n) {
	char *p = buf;
	while (n > 0) {
		ssize_t r = recv(s, p, n, 0);
		if (r <= 0) return -1;
		p += r; n -= (size_t)r;
	}
	return 0;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint64_t get(const uint8_t *p, int n) { uint64_t v = 0; for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i]; return v; }

static void *client(void *arg) {
	int s = (int)(intptr_t)arg;
	uint8_t hdr[24], payload[1000], rep[16 + 1000];
	if (readall(s, hdr, 24) || get(hdr + 2, 2) != 2 || get(hdr + 4, 4) > 1000) goto out;
	size_t plen = get(hdr + 4, 4);
	if (readall(s, payload, plen)) goto out;
	size_t nl = strlen(img_name);
	uint8_t *p = rep + 16;
	put16(p, 3); memcpy(p + 2, img_name, nl + 1); put16(p + 3 + nl, 1); put64(p + 5 + nl, img_size);
	size_t rl = 13 + nl;
	memcpy(rep, "sr", 2); put16(rep + 2, 2); put32(rep + 4, rl); put64(rep + 8, 0);
	if (send(s, rep, 16 + rl, MSG_NOSIGNAL) < 0) goto out;
	uint64_t last = 0;
	while (readall(s, hdr, 24) == 0) {
		uint16_t cmd = get(hdr + 2, 2);
		uint32_t size = get(hdr + 4, 4);
		uint64_t off = get(hdr + 8, 7), handle = get(hdr + 16, 8);
		memcpy(rep, "sr", 2);
		if (cmd == 1) {
			last = handle;
			int bad = off >= img_size || off + size > img_size;
			put16(rep + 2, bad ? 4 : 1); put32(rep + 4, bad ? 0 : size); put64(rep + 8, handle);
			if (send(s, rep, 16, bad ? MSG_NOSIGNAL : MSG_NOSIGNAL | MSG_MORE) < 0) break;
			off_t o = off;
			while (!bad && size > 0) {
				ssize_t n = sendfile(s, img_fd, &o, size);
				if (n <= 0) goto out;
				size -= n;
			}
		} else if (cmd == 5) {
			put16(rep + 2, 5); put32(rep + 4, 0); put64(rep + 8, last);
			if (send(s, rep, 16, MSG_NOSIGNAL) < 0) break;
		}
	}
out:
	close(s);
	return NULL;
}

int main(int argc, char **argv) {
	if (argc != 4) { fprintf(stderr, "usage: %s PORT IMAGE-NAME FILE\n", argv[0]); return 2; }
	img_name = argv[2];
	img_fd = open(argv[3], O_RDONLY);
	struct stat st;
	if (img_fd < 0 || fstat(img_fd, &st)) { perror(argv[3]); return 1; }
	img_size = ((uint64_t)st.st_size + 4095) & ~4095ULL;
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(l, (void *)&a, sizeof a) || listen(l, 1024)) { perror("listen"); return 1; }
	pthread_attr_t attr;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	pthread_attr_setstacksize(&attr, 64 << 10);
	for (;;) {
		int s = accept(l, NULL, NULL);
		if (s < 0) continue;
		setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		pthread_t t;
		if (pthread_create(&t, &attr, client, (void *)(intptr_t)s)) close(s);
	}
}
