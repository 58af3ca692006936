/** Resource limits: every breach is a resource_exhausted error naming the limit and its value. */
import { limitExceeded } from '../errors';

export interface Limits {
  maxVms: number;
  maxVcpusPerVm: number;
  maxMemoryPerVmBytes: number;
  maxMemoryTotalBytes: number;
}

export const DEFAULT_LIMITS: Limits = {
  maxVms: 64,
  maxVcpusPerVm: 32,
  maxMemoryPerVmBytes: 4 * 1024 ** 3,
  maxMemoryTotalBytes: 16 * 1024 ** 3,
};

export interface Usage {
  vms: number;
  memoryBytes: number;
}

export function checkCreate(limits: Limits, usage: Usage, vcpus: number, memoryBytes: number): void {
  if (usage.vms + 1 > limits.maxVms) throw limitExceeded('max_vms', `limit max_vms=${limits.maxVms} reached: ${usage.vms} VMs exist`);
  if (vcpus > limits.maxVcpusPerVm) throw limitExceeded('max_vcpus_per_vm', `${vcpus} vCPUs exceed limit max_vcpus_per_vm=${limits.maxVcpusPerVm}`);
  if (memoryBytes > limits.maxMemoryPerVmBytes)
    throw limitExceeded('max_memory_per_vm_bytes', `${memoryBytes} bytes of memory exceed limit max_memory_per_vm_bytes=${limits.maxMemoryPerVmBytes}`);
  if (usage.memoryBytes + memoryBytes > limits.maxMemoryTotalBytes)
    throw limitExceeded(
      'max_memory_total_bytes',
      `${memoryBytes} more bytes would bring guest memory to ${usage.memoryBytes + memoryBytes}, over limit max_memory_total_bytes=${limits.maxMemoryTotalBytes}`,
    );
}
