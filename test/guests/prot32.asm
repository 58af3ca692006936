; prot32: 32-bit protected mode (flat GDT); prints a line, reports 32, done(0), halts.
%include "entry_prot.inc"

    PUTS msg
    DEBUG 32
    DONE 0
    HALT_FOREVER

msg: db "protected mode ok", 10, 0
    GUEST_END
