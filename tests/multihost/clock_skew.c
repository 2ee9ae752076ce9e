/* A host whose wall clock is wrong by CLOCK_SKEW_SECONDS (LD_PRELOAD=clock_skew.so).
 *
 * Only the wall clock moves: CLOCK_REALTIME (time.time(), datetime.now(), gettimeofday,
 * time). CLOCK_MONOTONIC and every wait stay untouched, as on a real machine whose NTP is off.
 * Debian's faketime (libfaketime 0.9.10) cannot do this for Python 3.11: faking the monotonic
 * clock hangs lock timeouts (sem_clockwait, which it does not intercept), and leaving it alone
 * makes time.sleep fail with EINVAL (its clock_nanosleep wrapper shifts TIMER_ABSTIME deadlines
 * of CLOCK_MONOTONIC too).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_function)(clockid_t, struct timespec *);

static long long skew_seconds(void) {
    static int read;
    static long long seconds;
    if (!read) {
        const char *raw = getenv("CLOCK_SKEW_SECONDS");
        seconds = raw ? atoll(raw) : 0;
        read = 1;
    }
    return seconds;
}

static int real_clock_gettime(clockid_t clock, struct timespec *now) {
    static clock_gettime_function real;
    if (!real)
        real = (clock_gettime_function)dlsym(RTLD_NEXT, "clock_gettime");
    return real(clock, now);
}

int clock_gettime(clockid_t clock, struct timespec *now) {
    int result = real_clock_gettime(clock, now);
    if (result == 0 && (clock == CLOCK_REALTIME || clock == CLOCK_REALTIME_COARSE))
        now->tv_sec += skew_seconds();
    return result;
}

int gettimeofday(struct timeval *restrict now, void *restrict zone) {
    struct timespec wall;
    (void)zone;
    if (clock_gettime(CLOCK_REALTIME, &wall) != 0)
        return -1;
    now->tv_sec = wall.tv_sec;
    now->tv_usec = wall.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    if (out)
        *out = wall.tv_sec;
    return wall.tv_sec;
}
