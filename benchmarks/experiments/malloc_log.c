/* LD_PRELOAD logger of large allocations (>= 256 KiB) between mlog_start() and mlog_stop().
   Built and driven by benchmarks/experiments/malloc_log.py; one line per event: op time ptr bytes caller. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <stdint.h>
#include <time.h>

static void *(*real_malloc)(size_t), (*real_free)(void *), *(*real_calloc)(size_t, size_t), *(*real_realloc)(void *, size_t);
static int (*real_pm)(void **, size_t, size_t);
static void *(*real_aa)(size_t, size_t);
static volatile int on = 0; static int fd = -1;
#define MIN_SIZE (256 * 1024)
#define TAB (1 << 20)
static uintptr_t keys[TAB]; static size_t sizes[TAB];
static char boot[1 << 16]; static size_t boot_used = 0;
static __thread int inside = 0;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void init(void) {
  if (real_malloc) return;
  real_malloc = dlsym(RTLD_NEXT, "malloc"); real_free = dlsym(RTLD_NEXT, "free");
  real_calloc = dlsym(RTLD_NEXT, "calloc"); real_realloc = dlsym(RTLD_NEXT, "realloc");
  real_pm = dlsym(RTLD_NEXT, "posix_memalign"); real_aa = dlsym(RTLD_NEXT, "aligned_alloc");
}
static void emit(char op, void *p, size_t n, void *ra) {
  char b[200]; Dl_info info; const char *lib = "?"; uintptr_t off = 0;
  if (dladdr(ra, &info) && info.dli_fname) { lib = strrchr(info.dli_fname, '/') ? strrchr(info.dli_fname, '/') + 1 : info.dli_fname; off = (uintptr_t)ra - (uintptr_t)info.dli_fbase; }
  int k = snprintf(b, sizeof b, "%c %.6f %p %zu %s+0x%lx\n", op, now(), p, n, lib, (unsigned long)off);
  if (write(fd, b, k) < 0) {}
}
static void track(void *p, size_t n, void *ra) {
  if (!on || !p || n < MIN_SIZE || inside) return;
  inside = 1;
  size_t h = ((uintptr_t)p >> 6) & (TAB - 1);
  while (keys[h] && keys[h] != (uintptr_t)-1) h = (h + 1) & (TAB - 1);
  keys[h] = (uintptr_t)p; sizes[h] = n; emit('+', p, n, ra);
  inside = 0;
}
static void untrack(void *p, void *ra) {
  if (!p || inside) return;
  size_t h = ((uintptr_t)p >> 6) & (TAB - 1);
  for (int i = 0; i < 4096 && keys[h]; i++, h = (h + 1) & (TAB - 1))
    if (keys[h] == (uintptr_t)p) { inside = 1; if (on) emit('-', p, sizes[h], ra); keys[h] = (uintptr_t)-1; inside = 0; return; }
}
void mlog_start(const char *path) { fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644); on = 1; }
void mlog_stop(void) { on = 0; close(fd); }
void *malloc(size_t n) { init(); void *p = real_malloc(n); track(p, n, __builtin_return_address(0)); return p; }
void free(void *p) { if ((char *)p >= boot && (char *)p < boot + sizeof boot) return; init(); untrack(p, __builtin_return_address(0)); real_free(p); }
void *calloc(size_t a, size_t b) {
  if (!real_calloc) { size_t n = (a * b + 15) & ~15UL; void *p = boot + boot_used; boot_used += n; return p; }
  void *p = real_calloc(a, b); track(p, a * b, __builtin_return_address(0)); return p; }
void *realloc(void *q, size_t n) { init(); untrack(q, __builtin_return_address(0)); void *p = real_realloc(q, n); track(p, n, __builtin_return_address(0)); return p; }
int posix_memalign(void **r, size_t al, size_t n) { init(); int e = real_pm(r, al, n); if (!e) track(*r, n, __builtin_return_address(0)); return e; }
void *aligned_alloc(size_t al, size_t n) { init(); void *p = real_aa(al, n); track(p, n, __builtin_return_address(0)); return p; }
