; long64: 64-bit long mode (own page tables); prints a line, reports 64, done(0), halts.
%include "entry_long.inc"

    PUTS msg
    DEBUG 64
    DONE 0
    HALT_FOREVER

msg: db "long mode ok", 10, 0
    GUEST_END
