; real16: stays in real mode; prints a line, reports 16, done(0), halts.
%include "entry_real.inc"

    PUTS msg
    DEBUG 16
    DONE 0
    HALT_FOREVER

msg: db "real mode ok", 10, 0
    GUEST_END
