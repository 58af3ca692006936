; counter64: long mode, then counts forever (never halts).
;
; The counter is RBX (starts at 0). Each iteration:
;   inc rbx; mirror it to [0x9000 + 8*vcpu]; print rbx in decimal + '\n' on the
;   serial port (one OUT per byte); OUT ebx to the debug port 0x500.
; The printed number is converted from RBX at the start of every iteration and
; the conversion touches only RAX/RCX/RDX/RDI and this vCPU's stack, so a host
; that sets RBX=N while the vCPU is paused makes the next printed line N+1.
%include "entry_long.inc"

    lea r12, [COUNTER_BASE + rsi * 8]    ; this vCPU's mirror slot
    xor ebx, ebx
count:
    inc rbx
    mov [r12], rbx
    mov rax, rbx
    call print_dec
    mov eax, ebx
    mov dx, DEBUG_PORT
    out dx, eax
    jmp count

; Print RAX as unsigned decimal followed by '\n'. Clobbers RAX, RCX, RDX, RDI.
; Digits are built backwards in a 32-byte buffer on the (per-vCPU) stack:
; at most 20 digits + '\n'.
print_dec:
    sub rsp, 32
    lea rdi, [rsp + 32]
    dec rdi
    mov byte [rdi], 10
    mov ecx, 10
.digit:
    xor edx, edx
    div rcx                     ; rax = rax / 10, rdx = digit
    add dl, '0'
    dec rdi
    mov [rdi], dl
    test rax, rax
    jnz .digit
    mov dx, SERIAL_PORT
.out:
    mov al, [rdi]
    out dx, al
    inc rdi
    lea rcx, [rsp + 32]
    cmp rdi, rcx
    jb .out
    add rsp, 32
    ret

    GUEST_END
