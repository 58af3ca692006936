/**
 * grpc.health.v1 status of vcpud: overall ('') and per service. Everything starts NOT_SERVING, so a probe
 * never sees SERVING before KVM was opened and the services registered, and goes back to NOT_SERVING
 * first thing on shutdown, so load balancers drain before connections close.
 *
 * One Health can be registered on several servers (the API server and the plaintext probe server);
 * they share the status and Watch streams.
 */
import { HealthImplementation, type ServingStatus } from 'grpc-health-check';
import type { Logger } from './logging';
import { SERVICE_NAMES } from '../api/proto';
import type { ServiceSink } from './server';

export type { ServingStatus };

/** The overall status key of grpc.health.v1 (an empty service name). */
export const OVERALL = '';

export const VCPUD_SERVICES: readonly string[] = [SERVICE_NAMES.VcpuStateService, SERVICE_NAMES.VmService, SERVICE_NAMES.SnapshotService];

export interface HealthOptions {
  /** Services with a status of their own besides the overall one (default: vcpud's three). */
  services?: readonly string[];
  /** Logs transitions (warn when going NOT_SERVING, with the reason). */
  logger?: Logger;
}

export class Health {
  private readonly impl: HealthImplementation;
  private readonly statuses = new Map<string, ServingStatus>();
  private readonly services: readonly string[];
  private readonly logger?: Logger;
  private notServingReason: string | undefined = 'starting';

  constructor(options: HealthOptions = {}) {
    this.services = options.services ?? VCPUD_SERVICES;
    this.logger = options.logger;
    for (const name of [OVERALL, ...this.services]) this.statuses.set(name, 'NOT_SERVING');
    this.impl = new HealthImplementation(Object.fromEntries(this.statuses));
  }

  private set(name: string, status: ServingStatus): void {
    this.statuses.set(name, status);
    this.impl.setStatus(name, status); // also notifies Watch streams
  }

  /** Marks `services` (default: all of vcpud's) and the overall status SERVING. */
  setServing(services: readonly string[] = this.services): void {
    for (const name of services) this.set(name, 'SERVING');
    this.set(OVERALL, 'SERVING');
    if (this.notServingReason !== undefined) this.logger?.info('health: serving', { services: [...services] });
    this.notServingReason = undefined;
  }

  /** Marks every service and the overall status NOT_SERVING; `reason` is logged and kept for reason(). */
  setNotServing(reason: string): void {
    for (const name of this.statuses.keys()) this.set(name, 'NOT_SERVING');
    if (this.notServingReason !== reason) this.logger?.warn('health: not serving', { reason });
    this.notServingReason = reason;
  }

  /** The status of `service` ('' for overall); undefined for a service health does not know. */
  status(service: string = OVERALL): ServingStatus | undefined {
    return this.statuses.get(service);
  }

  /** Why vcpud is not serving, or undefined while serving. */
  reason(): string | undefined {
    return this.notServingReason;
  }

  /** Adds grpc.health.v1.Health (Check, Watch, List) to `server`. */
  register(server: ServiceSink): void {
    this.impl.addToServer(server);
  }
}
