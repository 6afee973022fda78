/*
 * dnbd3-hsbench: a minimal C handshake load generator, used by bench/ so
 * the handshake rate of a server is not limited by a Go client's own
 * overhead. Like the reference bench's run: connect, SELECT_IMAGE, read the
 * reply, one GET_BLOCK of 4 KiB at a random unaligned offset, read it,
 * close. Written from ../../../shared/spec/dnbd3-protocol.md.
 *
 * usage: dnbd3-hsbench PORT IMAGE-NAME THREADS RUNS   (prints handshakes/s)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port, runs;
static const char *name;
static long fails;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static int readall(int s, void *buf, size_t n) {
	char *p = buf;
	while (n > 0) {
		ssize_t r = recv(s, p, n, 0);
		if (r <= 0) return -1;
		p += r; n -= (size_t)r;
	}
	return 0;
}

static uint64_t get(const uint8_t *p, int n) { uint64_t v = 0; for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i]; return v; }

static int one(unsigned *seed) {
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (s < 0 || connect(s, (void *)&a, sizeof a)) { if (s >= 0) close(s); return -1; }
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	uint8_t req[24 + 1000] = { 's', 'r', 2 }, rep[16 + 1000], data[4096];
	size_t nl = strlen(name), pl = 2 + nl + 1 + 2 + 1;
	req[4] = pl; req[24] = 3; memcpy(req + 26, name, nl + 1);
	if (send(s, req, 24 + pl, MSG_NOSIGNAL) < 0 || readall(s, rep, 16) || readall(s, rep + 16, get(rep + 4, 4))) goto fail;
	uint64_t size = get(rep + 16 + 2 + nl + 1 + 2, 8);
	uint64_t off = (uint64_t)rand_r(seed) % (size - 4096);
	memset(req, 0, 24); req[0] = 's'; req[1] = 'r'; req[2] = 1; req[5] = 0x10;
	for (int i = 0; i < 7; i++) req[8 + i] = off >> (8 * i);
	if (send(s, req, 24, MSG_NOSIGNAL) < 0 || readall(s, rep, 16) || get(rep + 2, 2) != 1 || readall(s, data, 4096)) goto fail;
	close(s);
	return 0;
fail:
	close(s);
	return -1;
}

static void *worker(void *arg) {
	unsigned seed = (unsigned)(uintptr_t)arg;
	long f = 0;
	for (int i = 0; i < runs; i++) f += one(&seed) != 0;
	pthread_mutex_lock(&mu); fails += f; pthread_mutex_unlock(&mu);
	return NULL;
}

int main(int argc, char **argv) {
	if (argc != 5) { fprintf(stderr, "usage: %s PORT IMAGE-NAME THREADS RUNS\n", argv[0]); return 2; }
	port = atoi(argv[1]); name = argv[2];
	int threads = atoi(argv[3]); runs = atoi(argv[4]);
	pthread_t t[256];
	if (threads < 1 || threads > 256) return 2;
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
	for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
	clock_gettime(CLOCK_MONOTONIC, &b);
	double secs = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
	printf("%.1f handshakes/s (%ld fails)\n", (threads * (double)runs - fails) / secs, fails);
	return fails != 0;
}
