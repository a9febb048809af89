/* The limit for bench/exits.py: a bare KVM_RUN loop on the same guest code.
 * Guest: 64-bit user mode (CPL 3, IOPL 3) running `out %al,(%dx)` in a loop.
 * usage: kvm_pio_loop SECONDS   -> prints the number of port-I/O exits handled */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (4 << 20)
#define CODE_ADDR 0x100000
static const uint8_t code[] = {0x66, 0xba, 0x80, 0x00, 0xee, 0xeb, 0xfd};

static void die(const char *what) { perror(what); exit(1); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 5.0;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) die("KVM_SET_TSS_ADDR");
    memcpy(mem + CODE_ADDR, code, sizeof(code));
    /* Identity map the first 4 MiB with user-accessible 2 MiB pages. */
    uint64_t *pml4 = (uint64_t *)(mem + 0x9000), *pdpt = (uint64_t *)(mem + 0xa000),
             *pd = (uint64_t *)(mem + 0xb000);
    pml4[0] = 0xa000 | 7;
    pdpt[0] = 0xb000 | 7;
    pd[0] = 0x0 | 0x87;
    pd[1] = 0x200000 | 0x87;

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = 0x1b, .type = 0xb,
                             .present = 1, .dpl = 3, .db = 0, .s = 1, .l = 1, .g = 1};
    struct kvm_segment ds = {.base = 0, .limit = 0xffffffff, .selector = 0x23, .type = 0x3,
                             .present = 1, .dpl = 3, .db = 1, .s = 1, .l = 0, .g = 1};
    sregs.cs = cs;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = ds;
    sregs.cr0 = 0x80000011;  /* PG | ET | PE */
    sregs.cr3 = 0x9000;
    sregs.cr4 = 0x20;        /* PAE */
    sregs.efer = 0x500;      /* LME | LMA */
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = CODE_ADDR, .rsp = 0x200000, .rflags = 0x3002};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    unsigned long exits = 0;
    double end = now() + seconds;
    while (1) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        exits++;
        if ((exits & 1023) == 0 && now() >= end) break;
    }
    printf("%lu\n", exits);
    return 0;
}
