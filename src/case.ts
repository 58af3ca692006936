/**
 * Name case conversions, written once: the C structs and the protos spell fields in snake_case, the ffi
 * values and proto-loader objects in camelCase (apicBase <-> apic_base).
 */

/** camelCase -> snake_case: apicBase -> apic_base, lastOpcode -> last_opcode. */
export const snakeCase = (name: string): string => name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/** snake_case (or kebab-case, as users type it) -> camelCase: vcpu_events -> vcpuEvents, mp-state -> mpState. */
export const camelCase = (name: string): string => name.replace(/[_-]([a-z0-9])/g, (_, c: string) => c.toUpperCase());
