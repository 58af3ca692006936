; svm_counter_npt: svm_counter with nested paging for L2 (NP_ENABLE, nested_cr3
; = 0x30000): an identity map except L2-physical 0xa000, which is backed by
; 0xb000, so L2's counter shows up at GPA 0xb000. See ../README.md.
%define NESTED_NPT 1
%include "entry_long.inc"
%include "nested.inc"
    GUEST_END
