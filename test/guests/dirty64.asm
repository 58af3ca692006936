; dirty64: long mode, then writes a counter into the pages of a range, round robin, at a paced
; rate (one vCPU). Parameters live in a control block the host writes before (or while) it runs;
; they are read again before every burst, so the rate can change while the guest runs.
;
;   CTL+0x00 range start GPA (page-aligned)        0 -> 0x100000
;   CTL+0x08 pages in the range                    0 -> 256
;   CTL+0x10 pages per burst                       0 -> 1
;   CTL+0x18 TSC cycles per burst (the pace)       0 -> unpaced: as fast as the CPU goes
;   CTL+0x20 limit: done(0) once RBX reaches it    0 -> never
;   CTL+0x28 written by the guest: the last value written (RBX), after each page
;
; Each write: inc rbx; [start + 4096*r13] = rbx (u64 at the page's first byte); [CTL+0x28] = rbx;
; r13 = (r13 + 1) mod pages. So the value in page j is the largest k <= RBX with (k-1) mod pages
; == j (0 if none yet): a migrated copy can be checked for values lost or repeated.
; Registers the host must leave alone: RBX (counter), R13 (cursor), R14 (next deadline), RSP.
%include "entry_long.inc"

%define CTL          0x8000
%define DEF_START    0x100000
%define DEF_PAGES    256

    xor ebx, ebx
    xor r13d, r13d
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r14, rax                        ; first deadline: now
burst:
    mov r8, [CTL + 0x00]                ; range start
    test r8, r8
    jnz .have_start
    mov r8, DEF_START
.have_start:
    mov r9, [CTL + 0x08]                ; pages
    test r9, r9
    jnz .have_pages
    mov r9, DEF_PAGES
.have_pages:
    mov r10, [CTL + 0x10]               ; pages per burst
    test r10, r10
    jnz .write
    mov r10, 1
.write:
    cmp r13, r9                         ; the range may have shrunk since the last burst
    jb .in_range
    xor r13d, r13d
.in_range:
    inc rbx
    mov rax, r13
    shl rax, 12
    mov [r8 + rax], rbx
    mov [CTL + 0x28], rbx
    inc r13
    mov r11, [CTL + 0x20]               ; limit
    test r11, r11
    jz .next
    cmp rbx, r11
    jae finished
.next:
    dec r10
    jnz .write

    mov r11, [CTL + 0x18]               ; cycles per burst
    test r11, r11
    jz burst                            ; unpaced
    add r14, r11
.wait:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov rcx, rax
    sub rcx, r14                        ; now - deadline (signed)
    jns .due
    pause
    jmp .wait
.due:
    ; Far behind (the vCPU was paused or throttled): start pacing from now, no catch-up burst.
    mov rdx, r11
    shl rdx, 4
    cmp rcx, rdx
    jb burst
    mov r14, rax
    jmp burst

finished:
    DONE 0
    HALT_FOREVER

    GUEST_END
