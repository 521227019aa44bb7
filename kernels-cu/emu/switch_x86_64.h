// Minimal context switch of the kernels-cu emulator (x86-64 System V).
//
// void steel_emu_switch(void** save_sp, void* load_sp)
//   Saves the callee-saved registers (rbp, rbx, r12-r15), the x87 control word and MXCSR on
//   the current stack, stores the stack pointer in *save_sp, switches to load_sp and restores
//   the same frame from there. Everything else is caller-saved, so a plain call is a complete
//   switch (~10 ns, no syscall: glibc swapcontext also saves the signal mask with a syscall).
//
// steel_emu_fiber_entry: the first "return address" of a new fiber; calls r13(r12).
// Top-level asm inside a C++ unit, so it builds with the same compiler flags as the rest.
#pragma once
__asm__(
    "    .pushsection .text\n"
    "    .globl steel_emu_switch\n"
    "    .type steel_emu_switch, @function\n"
    "steel_emu_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $16, %rsp\n"
    "    stmxcsr 8(%rsp)\n"
    "    fnstcw (%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    fldcw (%rsp)\n"
    "    ldmxcsr 8(%rsp)\n"
    "    addq $16, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    "    .size steel_emu_switch, .-steel_emu_switch\n"
    "\n"
    "    .globl steel_emu_fiber_entry\n"
    "    .type steel_emu_fiber_entry, @function\n"
    "steel_emu_fiber_entry:\n"
    "    movq %r12, %rdi\n"
    "    callq *%r13\n"
    "    ud2\n"
    "    .size steel_emu_fiber_entry, .-steel_emu_fiber_entry\n"
    "    .popsection\n"
);
