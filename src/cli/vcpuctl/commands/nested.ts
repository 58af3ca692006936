/** `vcpuctl nested get|show|set`: a vCPU's nested (VMX/SVM) state blob and its decoded view. */
import { NO_IMPLICIT_PAUSE, VCPU_OPTION, vcpuOf, type Command } from '../command';
import { enumShort, formatNestedState, hexdump } from '../format';

export const nestedCommands: Command[] = [
  {
    path: ['nested', 'get'],
    summary: 'Read the nested state blob (GetNestedState): write it to --out FILE, or hexdump it.',
    positionals: ['VM'],
    options: [VCPU_OPTION, { name: 'out', type: 'string', arg: 'FILE', help: 'write the raw kvm_nested_state bytes to FILE' }, NO_IMPLICIT_PAUSE],
    async run(ctx) {
      const vmId = ctx.positionals[0];
      const resp = await ctx.client().getNestedState({ vmId, vcpuId: vcpuOf(ctx), noImplicitPause: ctx.options.bool('no-implicit-pause') });
      const n = resp.nestedState;
      const raw = n?.raw ?? Buffer.alloc(0);
      const out = ctx.options.string('out');
      if (out !== undefined) {
        const full = ctx.writeFile(out, raw);
        if (!ctx.json)
          ctx.print(
            `wrote ${raw.length} bytes (format ${enumShort(n?.format, 'NESTED_FORMAT_')}, flags ${(n?.flagNames ?? []).join(' ') || 'none'}) to ${full}`,
          );
      }
      if (ctx.json) ctx.printJson(resp);
      else if (out === undefined) ctx.print(hexdump(raw));
    },
  },
  {
    path: ['nested', 'show'],
    summary: 'Show the decoded nested state: flags, format, size, header, vmcb12 fields or vmcs12 revision.',
    positionals: ['VM'],
    options: [VCPU_OPTION, NO_IMPLICIT_PAUSE],
    async run(ctx) {
      const resp = await ctx.client().getNestedState({ vmId: ctx.positionals[0], vcpuId: vcpuOf(ctx), noImplicitPause: ctx.options.bool('no-implicit-pause') });
      if (ctx.json) ctx.printJson(resp);
      else ctx.print(resp.nestedState ? formatNestedState(resp.nestedState) : '(no nested state)');
    },
  },
  {
    path: ['nested', 'set'],
    summary: 'Write a nested state blob (SetNestedState), e.g. one saved by `nested get --out`.',
    positionals: ['VM'],
    options: [VCPU_OPTION, { name: 'in', type: 'string', arg: 'FILE', required: true, help: 'the raw kvm_nested_state bytes' }, NO_IMPLICIT_PAUSE],
    async run(ctx) {
      const raw = ctx.readFile('--in', ctx.options.string('in') as string);
      const resp = await ctx
        .client()
        .setNestedState({ vmId: ctx.positionals[0], vcpuId: vcpuOf(ctx), raw, noImplicitPause: ctx.options.bool('no-implicit-pause') });
      if (ctx.json) ctx.printJson(resp);
      else ctx.print(`nested state set (${raw.length} bytes)`);
    },
  },
];
