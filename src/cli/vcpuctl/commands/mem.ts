/** `vcpuctl mem read|write`: guest memory (ReadMemory stream, WriteMemory in 1 MiB chunks). */
import { UsageError } from '../args';
import type { Command } from '../command';
import { hex, hexdump } from '../format';

/** WriteMemory chunk: well under the default 4 MiB message limit. */
export const WRITE_CHUNK = 1 << 20;

export const memCommands: Command[] = [
  {
    path: ['mem', 'read'],
    summary: 'Read guest memory: a hexdump, or the bytes to --out FILE.',
    positionals: ['VM'],
    options: [
      { name: 'gpa', type: 'u64', arg: 'ADDR', required: true, help: 'guest-physical start address' },
      { name: 'length', type: 'size', arg: 'SIZE', required: true, help: 'bytes to read, e.g. 4096 or 4Ki' },
      { name: 'out', type: 'string', arg: 'FILE', help: 'write the bytes to FILE instead of a hexdump' },
    ],
    async run(ctx) {
      const vmId = ctx.positionals[0];
      const gpa = ctx.options.big('gpa') as bigint;
      const length = ctx.options.big('length') as bigint;
      if (length > BigInt(2 ** 31)) throw new UsageError('--length: at most 2 GiB per read', 'mem read');
      const data = await ctx.client().readMemory({ vmId, guestPhysicalAddress: gpa.toString(), length: length.toString() });
      const out = ctx.options.string('out');
      let file: string | undefined;
      if (out !== undefined) file = ctx.writeFile(out, data);
      if (ctx.json)
        ctx.printJson(
          file !== undefined
            ? { guestPhysicalAddress: gpa.toString(), length: data.length, file }
            : { guestPhysicalAddress: gpa.toString(), length: data.length, data },
        );
      else if (file !== undefined) ctx.print(`wrote ${data.length} bytes from ${hex(gpa)} to ${file}`);
      else ctx.print(hexdump(data, gpa));
    },
  },
  {
    path: ['mem', 'write'],
    summary: 'Write the bytes of FILE into guest memory at --gpa.',
    positionals: ['VM'],
    options: [
      { name: 'gpa', type: 'u64', arg: 'ADDR', required: true, help: 'guest-physical start address' },
      { name: 'in', type: 'string', arg: 'FILE', required: true, help: 'the bytes to write' },
    ],
    async run(ctx) {
      const vmId = ctx.positionals[0];
      const gpa = ctx.options.big('gpa') as bigint;
      const data = ctx.readFile('--in', ctx.options.string('in') as string);
      const client = ctx.client();
      for (let off = 0; off < data.length || off === 0; off += WRITE_CHUNK) {
        await client.writeMemory({ vmId, guestPhysicalAddress: (gpa + BigInt(off)).toString(), data: data.subarray(off, off + WRITE_CHUNK) });
        if (data.length === 0) break;
      }
      if (ctx.json) ctx.printJson({ guestPhysicalAddress: gpa.toString(), length: data.length });
      else ctx.print(`wrote ${data.length} bytes at ${hex(gpa)}`);
    },
  },
];
