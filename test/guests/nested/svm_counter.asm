; svm_counter: L1 (long mode) VMRUNs an L2 (long mode, L1's page tables, no
; nested paging) that counts in RBX and [0xa000] and OUTs each count to 0x500.
; See ../README.md, "Nested SVM guests".
%define NESTED_NPT 0
%include "entry_long.inc"
%include "nested.inc"
    GUEST_END
