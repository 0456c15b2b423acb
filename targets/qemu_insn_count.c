/*
 * qemu-user TCG plugin: deterministic count of executed guest instructions, in total and
 * inside "regions" the guest program marks with a magic system call.
 *
 * Built by targets/device_qemu.py for the host (plugin API version 1, QEMU 6.0 to 8.x, as
 * Debian's qemu-user 7.2 ships it without its contrib plugins) and loaded with
 *     qemu-aarch64 -plugin insn_count.so -d plugin -D LOG ...
 *
 * Counting: every translated block gets an execution callback carrying its instruction
 * count; the callback adds it to the executing vCPU's (= guest thread's) counter, so no
 * atomics are needed. A block left early by a fault would be over-counted by its tail;
 * the self-check programs do not fault, and the count is the same on every run of the
 * same program and inputs (it does not depend on the host's speed or load).
 *
 * Regions: the guest calls syscall(MARK_NR, MARK_MAGIC, 1) to open a region and
 * syscall(MARK_NR, MARK_MAGIC, 2) to close it (MARK_NR is no Linux system call: the
 * guest gets -ENOSYS, nothing else happens). Instructions executed between them by the
 * marking thread are added to the region total. Other threads are not counted in regions
 * (the runner pins TVM and BLAS to one thread for that reason).
 *
 * At exit it writes one line:  insn_count total=N region=M regions=K
 *
 * The declarations below are the stable plugin ABI (include/qemu/qemu-plugin.h, v1),
 * written out because Debian packages no header for it.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
struct qemu_plugin_tb;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*syscall_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index, int64_t num, uint64_t a1,
                             uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7,
                             uint64_t a8);

extern void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, vcpu_udata_cb_t cb,
                                                 enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *userdata);
extern void qemu_plugin_outs(const char *string);

EXPORT int qemu_plugin_version = 1;

#define MAX_VCPUS 4096
#define MARK_NR 0x4321
#define MARK_MAGIC 0xC0FFEEULL

static uint64_t counts[MAX_VCPUS];
static uint64_t overflow; /* threads beyond MAX_VCPUS (never expected) */
static uint64_t region_start[MAX_VCPUS];
static int region_open[MAX_VCPUS];
static uint64_t region_total;
static uint64_t regions;

static void on_exec(unsigned int vcpu, void *udata)
{
    uint64_t n = (uint64_t)(uintptr_t)udata;
    if (vcpu < MAX_VCPUS)
        counts[vcpu] += n;
    else
        __atomic_fetch_add(&overflow, n, __ATOMIC_RELAXED);
}

static void on_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)n);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    (void)id; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
    if (num != MARK_NR || a1 != MARK_MAGIC || vcpu >= MAX_VCPUS)
        return;
    if (a2 == 1) {
        region_start[vcpu] = counts[vcpu];
        region_open[vcpu] = 1;
    } else if (a2 == 2 && region_open[vcpu]) {
        region_total += counts[vcpu] - region_start[vcpu];
        region_open[vcpu] = 0;
        regions++;
    }
}

static void on_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id; (void)udata;
    uint64_t total = overflow;
    for (int i = 0; i < MAX_VCPUS; i++)
        total += counts[i];
    char line[160];
    snprintf(line, sizeof line, "insn_count total=%llu region=%llu regions=%llu\n",
             (unsigned long long)total, (unsigned long long)region_total, (unsigned long long)regions);
    qemu_plugin_outs(line);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc, char **argv)
{
    (void)info; (void)argc; (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
