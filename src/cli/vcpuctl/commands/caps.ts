/** `vcpuctl caps`: the host's KVM facts as the server sees them (GetCapabilities). */
import type { Command } from '../command';
import { formatCapabilities } from '../format';

export const capsCommands: Command[] = [
  {
    path: ['caps'],
    summary: 'Show the host KVM capabilities: summary, nested support, state sections, KVM_CAP_* values.',
    positionals: [],
    options: [],
    async run(ctx) {
      const caps = await ctx.client().getCapabilities();
      if (ctx.json) ctx.printJson(caps);
      else ctx.print(formatCapabilities(caps));
    },
  },
];
