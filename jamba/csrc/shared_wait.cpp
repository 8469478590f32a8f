// Waiting for a 32-bit word in shared memory to change, across processes, for the shared-memory links of
// cluster/links.py. Loaded with the kernels by jamba/native.py.
//
// A waiter first spins, calling sched_yield between reads so that a process that needs its core gets it at
// once, and then sleeps on a futex. It goes to sleep early when a yield let another process run. The scheduler
// shares a core fairly between runnable processes, so a spinner that kept yielding would still take its share
// from the process it waits for when both run on one core. The writer wakes sleepers only when the waiter count is not zero, so a
// message to a spinning reader costs one store. Waking a sleeping process on another core takes 100 us or more
// on a virtual machine, against about 3 us for a spinning one.
//
// Ordering: the writer's store is sequentially consistent and follows its plain stores of the message, so a
// reader that sees the new value also sees the message. The waiter raises the count before its last read of the
// word and the writer stores the word before it reads the count; both are sequentially consistent, so either the
// waiter sees the new value or the writer sees the waiter.

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <climits>
#include <cstdint>

namespace {

int64_t now_ns() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

// A spin that waited this long in one sched_yield gave its core to another process.
constexpr int64_t kYieldedNs = 50000;

uint32_t load(const uint32_t* word) { return __atomic_load_n(word, __ATOMIC_SEQ_CST); }

}  // namespace

extern "C" {

// Wait until *word != expected: spin for up to spin_ns, then sleep for up to sleep_ns. Return 1 once the word
// changed and 0 when the time ran out. *waiters counts the sleepers on word (shared with jamba_set_word).
int64_t jamba_wait_word(uint32_t* word, uint32_t expected, uint32_t* waiters, int64_t spin_ns, int64_t sleep_ns) {
    const int64_t spin_end = now_ns() + spin_ns;
    for (int64_t now = now_ns(); now < spin_end;) {
        if (load(word) != expected) return 1;
        sched_yield();
        const int64_t before = now;
        now = now_ns();
        // A yield this long ran another process on this core, which the spinning would slow down: sleep instead.
        if (now - before > kYieldedNs) break;
    }
    if (load(word) != expected) return 1;
    if (sleep_ns <= 0) return 0;
    timespec timeout{static_cast<time_t>(sleep_ns / 1000000000LL), static_cast<long>(sleep_ns % 1000000000LL)};
    __atomic_add_fetch(waiters, 1, __ATOMIC_SEQ_CST);
    if (load(word) == expected) {
        // Returns at a change, a wake-up, a signal or the timeout; the caller's loop sorts them out.
        syscall(SYS_futex, word, FUTEX_WAIT, expected, &timeout, nullptr, 0);
    }
    __atomic_sub_fetch(waiters, 1, __ATOMIC_SEQ_CST);
    return load(word) != expected;
}

// Store value into *word and wake the processes sleeping on it, if any.
void jamba_set_word(uint32_t* word, uint32_t value, uint32_t* waiters) {
    __atomic_store_n(word, value, __ATOMIC_SEQ_CST);
    if (load(waiters) != 0) syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}

}  // extern "C"
