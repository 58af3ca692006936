/*
 * Prints, as JSON, what the C compiler says about the KVM vCPU state structs in this machine's
 * <linux/kvm.h>: sizeof each struct, offsetof and sizeof every member (nested ones by path, array
 * members also as element [0]), and the constants the TypeScript codecs restate. The test
 * test/unit/sections.test.ts holds the layout tables in src/ffi/sections to this output.
 */
#include <asm/kvm_para.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdio.h>

static const char *sep;

static void begin(const char *name, size_t size) {
  printf("%s\n  \"%s\": {\"size\": %zu, \"fields\": {", sep, name, size);
  sep = "";
}
static void member(const char *path, size_t offset, size_t size) {
  printf("%s\n    \"%s\": [%zu, %zu]", sep, path, offset, size);
  sep = ",";
}
static void end(void) {
  printf("\n  }}");
  sep = ",";
}
static void constant(const char *name, unsigned long long value) {
  printf("%s\n  \"%s\": %llu", sep, name, value);
  sep = ",";
}

#define S(T) begin(#T, sizeof(struct T))
/* A member by path; M(kvm_sregs, cs.base) prints "cs.base". */
#define M(T, m) member(#m, offsetof(struct T, m), sizeof(((struct T *)0)->m))
/* A flexible array member has no sizeof: its element [0] carries the size. */
#define FLEX(T, m) member(#m "[0]", offsetof(struct T, m[0]), sizeof(((struct T *)0)->m[0]))
#define ARR(T, m) M(T, m); M(T, m[0])
#define K(c) constant(#c, (unsigned long long)(c))

/* Macro parameter names must not be member names: kvm_segment has a member `s`. */
#define SEGMENT(T, seg_)                                                                     \
  M(T, seg_); M(T, seg_.base); M(T, seg_.limit); M(T, seg_.selector); M(T, seg_.type);         \
  M(T, seg_.present); M(T, seg_.dpl); M(T, seg_.db); M(T, seg_.s); M(T, seg_.l); M(T, seg_.g); \
  M(T, seg_.avl); M(T, seg_.unusable); M(T, seg_.padding)
#define DTABLE(T, dt_) M(T, dt_); M(T, dt_.base); M(T, dt_.limit); ARR(T, dt_.padding)
#define SREGS_COMMON(T)                                                                    \
  SEGMENT(T, cs); SEGMENT(T, ds); SEGMENT(T, es); SEGMENT(T, fs); SEGMENT(T, gs);           \
  SEGMENT(T, ss); SEGMENT(T, tr); SEGMENT(T, ldt); DTABLE(T, gdt); DTABLE(T, idt);          \
  M(T, cr0); M(T, cr2); M(T, cr3); M(T, cr4); M(T, cr8); M(T, efer); M(T, apic_base)

int main(void) {
  printf("{\"structs\": {");
  sep = "";

  S(kvm_regs);
  M(kvm_regs, rax); M(kvm_regs, rbx); M(kvm_regs, rcx); M(kvm_regs, rdx);
  M(kvm_regs, rsi); M(kvm_regs, rdi); M(kvm_regs, rsp); M(kvm_regs, rbp);
  M(kvm_regs, r8); M(kvm_regs, r9); M(kvm_regs, r10); M(kvm_regs, r11);
  M(kvm_regs, r12); M(kvm_regs, r13); M(kvm_regs, r14); M(kvm_regs, r15);
  M(kvm_regs, rip); M(kvm_regs, rflags);
  end();

  S(kvm_segment);
  M(kvm_segment, base); M(kvm_segment, limit); M(kvm_segment, selector); M(kvm_segment, type);
  M(kvm_segment, present); M(kvm_segment, dpl); M(kvm_segment, db); M(kvm_segment, s);
  M(kvm_segment, l); M(kvm_segment, g); M(kvm_segment, avl); M(kvm_segment, unusable);
  M(kvm_segment, padding);
  end();

  S(kvm_dtable);
  M(kvm_dtable, base); M(kvm_dtable, limit); ARR(kvm_dtable, padding);
  end();

  S(kvm_sregs);
  SREGS_COMMON(kvm_sregs);
  ARR(kvm_sregs, interrupt_bitmap);
  end();

  S(kvm_sregs2);
  SREGS_COMMON(kvm_sregs2);
  M(kvm_sregs2, flags); ARR(kvm_sregs2, pdptrs);
  end();

  S(kvm_fpu);
  ARR(kvm_fpu, fpr); M(kvm_fpu, fcw); M(kvm_fpu, fsw); M(kvm_fpu, ftwx); M(kvm_fpu, pad1);
  M(kvm_fpu, last_opcode); M(kvm_fpu, last_ip); M(kvm_fpu, last_dp); ARR(kvm_fpu, xmm);
  M(kvm_fpu, mxcsr); M(kvm_fpu, pad2);
  end();

  S(kvm_xcr);
  M(kvm_xcr, xcr); M(kvm_xcr, reserved); M(kvm_xcr, value);
  end();

  S(kvm_xcrs);
  M(kvm_xcrs, nr_xcrs); M(kvm_xcrs, flags); ARR(kvm_xcrs, xcrs);
  M(kvm_xcrs, xcrs[0].xcr); M(kvm_xcrs, xcrs[0].reserved); M(kvm_xcrs, xcrs[0].value);
  ARR(kvm_xcrs, padding);
  end();

  S(kvm_msr_entry);
  M(kvm_msr_entry, index); M(kvm_msr_entry, reserved); M(kvm_msr_entry, data);
  end();

  S(kvm_msrs);
  M(kvm_msrs, nmsrs); M(kvm_msrs, pad); FLEX(kvm_msrs, entries);
  M(kvm_msrs, entries[0].index); M(kvm_msrs, entries[0].reserved); M(kvm_msrs, entries[0].data);
  end();

  S(kvm_msr_list);
  M(kvm_msr_list, nmsrs); FLEX(kvm_msr_list, indices);
  end();

  S(kvm_vcpu_events);
  M(kvm_vcpu_events, exception);
  M(kvm_vcpu_events, exception.injected); M(kvm_vcpu_events, exception.nr);
  M(kvm_vcpu_events, exception.has_error_code); M(kvm_vcpu_events, exception.pending);
  M(kvm_vcpu_events, exception.error_code);
  M(kvm_vcpu_events, interrupt);
  M(kvm_vcpu_events, interrupt.injected); M(kvm_vcpu_events, interrupt.nr);
  M(kvm_vcpu_events, interrupt.soft); M(kvm_vcpu_events, interrupt.shadow);
  M(kvm_vcpu_events, nmi);
  M(kvm_vcpu_events, nmi.injected); M(kvm_vcpu_events, nmi.pending); M(kvm_vcpu_events, nmi.masked);
  M(kvm_vcpu_events, nmi.pad);
  M(kvm_vcpu_events, sipi_vector); M(kvm_vcpu_events, flags);
  M(kvm_vcpu_events, smi);
  M(kvm_vcpu_events, smi.smm); M(kvm_vcpu_events, smi.pending); M(kvm_vcpu_events, smi.smm_inside_nmi);
  M(kvm_vcpu_events, smi.latched_init);
  M(kvm_vcpu_events, triple_fault); M(kvm_vcpu_events, triple_fault.pending);
  ARR(kvm_vcpu_events, reserved);
  M(kvm_vcpu_events, exception_has_payload); M(kvm_vcpu_events, exception_payload);
  end();

  S(kvm_debugregs);
  ARR(kvm_debugregs, db); M(kvm_debugregs, dr6); M(kvm_debugregs, dr7); M(kvm_debugregs, flags);
  ARR(kvm_debugregs, reserved);
  end();

  S(kvm_mp_state);
  M(kvm_mp_state, mp_state);
  end();

  S(kvm_cpuid_entry2);
  M(kvm_cpuid_entry2, function); M(kvm_cpuid_entry2, index); M(kvm_cpuid_entry2, flags);
  M(kvm_cpuid_entry2, eax); M(kvm_cpuid_entry2, ebx); M(kvm_cpuid_entry2, ecx); M(kvm_cpuid_entry2, edx);
  ARR(kvm_cpuid_entry2, padding);
  end();

  S(kvm_cpuid2);
  M(kvm_cpuid2, nent); M(kvm_cpuid2, padding); FLEX(kvm_cpuid2, entries);
  M(kvm_cpuid2, entries[0].function); M(kvm_cpuid2, entries[0].index); M(kvm_cpuid2, entries[0].flags);
  M(kvm_cpuid2, entries[0].eax); M(kvm_cpuid2, entries[0].ebx); M(kvm_cpuid2, entries[0].ecx);
  M(kvm_cpuid2, entries[0].edx); ARR(kvm_cpuid2, entries[0].padding);
  end();

  S(kvm_lapic_state);
  ARR(kvm_lapic_state, regs);
  end();

  S(kvm_xsave);
  ARR(kvm_xsave, region); FLEX(kvm_xsave, extra);
  end();

  printf("\n}, \"constants\": {");
  sep = "";
  K(KVM_NR_INTERRUPTS); K(KVM_MAX_XCRS); K(KVM_APIC_REG_SIZE); K(KVM_SREGS2_FLAGS_PDPTRS_VALID);
  K(KVM_VCPUEVENT_VALID_NMI_PENDING); K(KVM_VCPUEVENT_VALID_SIPI_VECTOR); K(KVM_VCPUEVENT_VALID_SHADOW);
  K(KVM_VCPUEVENT_VALID_SMM); K(KVM_VCPUEVENT_VALID_PAYLOAD); K(KVM_VCPUEVENT_VALID_TRIPLE_FAULT);
  K(KVM_X86_SHADOW_INT_MOV_SS); K(KVM_X86_SHADOW_INT_STI);
  K(KVM_CPUID_FLAG_SIGNIFCANT_INDEX); K(KVM_CPUID_FLAG_STATEFUL_FUNC); K(KVM_CPUID_FLAG_STATE_READ_NEXT);
  K(KVM_MP_STATE_RUNNABLE); K(KVM_MP_STATE_UNINITIALIZED); K(KVM_MP_STATE_INIT_RECEIVED);
  K(KVM_MP_STATE_HALTED); K(KVM_MP_STATE_SIPI_RECEIVED); K(KVM_MP_STATE_STOPPED);
  K(KVM_MP_STATE_CHECK_STOP); K(KVM_MP_STATE_OPERATING); K(KVM_MP_STATE_LOAD);
  K(KVM_MP_STATE_AP_RESET_HOLD); K(KVM_MP_STATE_SUSPENDED);
  K(MSR_KVM_WALL_CLOCK); K(MSR_KVM_SYSTEM_TIME); K(MSR_KVM_WALL_CLOCK_NEW); K(MSR_KVM_SYSTEM_TIME_NEW);
  K(MSR_KVM_ASYNC_PF_EN); K(MSR_KVM_STEAL_TIME); K(MSR_KVM_PV_EOI_EN); K(MSR_KVM_POLL_CONTROL);
  K(MSR_KVM_ASYNC_PF_INT); K(MSR_KVM_ASYNC_PF_ACK); K(MSR_KVM_MIGRATION_CONTROL);
  printf("\n}}\n");
  return 0;
}
