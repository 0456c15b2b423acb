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
 * Classes: every instruction is classified once, at translation, by its AArch64 encoding group
 * (op0 = bits 28..25): loads and stores (x1x0; a load when bit 22, the L bit of most forms, is
 * set, or a literal load), SIMD & floating point data processing (x111), branches / exceptions /
 * system (101x), everything else integer. Regions keep per-class totals.
 *
 * At every region close it writes
 *     insn_region total=N load=L store=S simd=V branch=B
 * (the counts of that one region; the cost-model calibration, bench/cost_model_arm.py, reads
 * them) and at exit one line:  insn_count total=N region=M regions=K load=L store=S simd=V branch=B
 * (load..branch: summed over the regions).
 *
 * The declarations below are the stable plugin ABI (include/qemu/qemu-plugin.h, v1),
 * written out because Debian packages no header for it.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
struct qemu_plugin_insn;
extern size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
extern struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
extern const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
extern size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
extern void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, vcpu_udata_cb_t cb,
                                                 enum qemu_plugin_cb_flags flags, void *userdata);
extern void qemu_plugin_register_vcpu_syscall_cb(qemu_plugin_id_t id, syscall_cb_t cb);
extern void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, udata_cb_t cb, void *userdata);
extern void qemu_plugin_outs(const char *string);

EXPORT int qemu_plugin_version = 1;

#define MAX_VCPUS 4096
#define MARK_NR 0x4321
#define MARK_MAGIC 0xC0FFEEULL

enum { C_TOTAL, C_LOAD, C_STORE, C_SIMD, C_BRANCH, N_CLASSES };

static uint64_t counts[MAX_VCPUS][N_CLASSES];
static uint64_t overflow; /* threads beyond MAX_VCPUS (never expected) */
static uint64_t region_start[MAX_VCPUS][N_CLASSES];
static int region_open[MAX_VCPUS];
static uint64_t region_total[N_CLASSES];
static uint64_t regions;

static int classify(uint32_t w)
{
    uint32_t op0 = (w >> 25) & 0xF;
    if ((op0 & 0x5) == 0x4) {                       /* x1x0: loads and stores */
        if (((w >> 27) & 0x7) == 0x3 && !((w >> 24) & 1))  /* 011x0: load register (literal) */
            return C_LOAD;
        return ((w >> 22) & 1) ? C_LOAD : C_STORE;
    }
    if ((op0 & 0x7) == 0x7)                           /* x111: SIMD and FP data processing */
        return C_SIMD;
    if ((op0 & 0xE) == 0xA)                           /* 101x: branches, exceptions, system */
        return C_BRANCH;
    return -1;                                        /* integer data processing */
}

static void on_exec(unsigned int vcpu, void *udata)
{
    const uint64_t *n = udata;
    if (vcpu < MAX_VCPUS)
        for (int c = 0; c < N_CLASSES; c++)
            counts[vcpu][c] += n[c];
    else
        __atomic_fetch_add(&overflow, n[C_TOTAL], __ATOMIC_RELAXED);
}

static void on_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t *cls = calloc(N_CLASSES, sizeof *cls); /* lives as long as the translated block may run */
    if (!cls)
        return;
    cls[C_TOTAL] = n;
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint32_t w = 0;
        if (qemu_plugin_insn_size(insn) >= 4)
            memcpy(&w, qemu_plugin_insn_data(insn), 4);
        int c = classify(w);
        if (c > 0)
            cls[c]++;
    }
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_exec, QEMU_PLUGIN_CB_NO_REGS, cls);
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    (void)id; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
    if (num != MARK_NR || a1 != MARK_MAGIC || vcpu >= MAX_VCPUS)
        return;
    if (a2 == 1) {
        memcpy(region_start[vcpu], counts[vcpu], sizeof counts[vcpu]);
        region_open[vcpu] = 1;
    } else if (a2 == 2 && region_open[vcpu]) {
        uint64_t d[N_CLASSES];
        for (int c = 0; c < N_CLASSES; c++) {
            d[c] = counts[vcpu][c] - region_start[vcpu][c];
            region_total[c] += d[c];
        }
        region_open[vcpu] = 0;
        regions++;
        char line[200];
        snprintf(line, sizeof line, "insn_region total=%llu load=%llu store=%llu simd=%llu branch=%llu\n",
                 (unsigned long long)d[C_TOTAL], (unsigned long long)d[C_LOAD], (unsigned long long)d[C_STORE],
                 (unsigned long long)d[C_SIMD], (unsigned long long)d[C_BRANCH]);
        qemu_plugin_outs(line);
    }
}

static void at_exit_cb(qemu_plugin_id_t id, void *udata)
{
    (void)id; (void)udata;
    uint64_t total = overflow;
    for (int i = 0; i < MAX_VCPUS; i++)
        total += counts[i][C_TOTAL];
    char line[256];
    snprintf(line, sizeof line,
             "insn_count total=%llu region=%llu regions=%llu load=%llu store=%llu simd=%llu branch=%llu\n",
             (unsigned long long)total, (unsigned long long)region_total[C_TOTAL], (unsigned long long)regions,
             (unsigned long long)region_total[C_LOAD], (unsigned long long)region_total[C_STORE],
             (unsigned long long)region_total[C_SIMD], (unsigned long long)region_total[C_BRANCH]);
    qemu_plugin_outs(line);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const void *info, int argc, char **argv)
{
    (void)info; (void)argc; (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit_cb, NULL);
    return 0;
}
