/**
 * A hook for metrics: src/server installs an observer; the ffi layer reports every ioctl's
 * duration and errno, and every size-negotiation retry. No observer, no cost beyond a branch.
 */
export interface IoctlObserver {
  onIoctl(ioctl: string, seconds: number, errorCode?: string): void;
  onNegotiationRetry(ioctl: string): void;
}

let observer: IoctlObserver | undefined;

export function setIoctlObserver(o: IoctlObserver | undefined): void {
  observer = o;
}

export function currentObserver(): IoctlObserver | undefined {
  return observer;
}
