/**
 * A hook for metrics: src/server installs an observer; the ffi layer reports every ioctl's
 * duration and errno, and every size-negotiation retry. No observer, no cost beyond a branch.
 */
export interface IoctlObserver {
  onIoctl(ioctl: string, seconds: number, errorCode?: string): void;
  /** A recorder of `ioctl`'s successful durations, as onIoctl records them: bound once by callers that make the same ioctls again and again (a batch). */
  durationRecorder?(ioctl: string): (seconds: number) => void;
  onNegotiationRetry(ioctl: string): void;
}

let observer: IoctlObserver | undefined;

export function setIoctlObserver(o: IoctlObserver | undefined): void {
  observer = o;
}

export function currentObserver(): IoctlObserver | undefined {
  return observer;
}
