; unhandled64: long mode; prints "mmio next\n", then writes 0xdeadbeef (4 bytes)
; to GPA 0xd0000000, which is mapped by the identity page tables but is not RAM,
; so KVM exits to the host with KVM_EXIT_MMIO. A host that treats that exit as
; fatal never sees what follows; one that skips it gets done(1) ("MMIO ignored").
%include "entry_long.inc"

%define MMIO_ADDR 0xd0000000

    PUTS msg
    mov rax, MMIO_ADDR          ; > 2 GiB: not encodable as a disp32, go through a register
    mov dword [rax], 0xdeadbeef
    DONE 1
    HALT_FOREVER

msg: db "mmio next", 10, 0
    GUEST_END
