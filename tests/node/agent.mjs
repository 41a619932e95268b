#!/usr/bin/env node
// A Node.js agent for agentpost's cross-language tests. It loads the same protos/ the Python SDK is
// generated from, at run time, with @grpc/proto-loader, and holds one Connect session.
//
//   node agent.mjs --server HOST:PORT --agent-id ID --script echo [--max N]
//   node agent.mjs --server HOST:PORT --agent-id ID --script ask --to TARGET
//   common: [--timeout SECONDS (default 20; 0 = none)] [--protos DIR (default ../../protos)]
//
// Output: one JSON object per line on stdout, each with an "event" field; diagnostics on stderr.
//   echo: {"event":"ready","session_id"}, then per MESSAGE delivery {"event":"message","sender","id",
//         "payload","headers"}; per REQUEST {"event":"request",...}, answered with
//         {"echo": <payload>, "from": "node"}, then {"event":"replied","correlation_id"} once the
//         reply is written (the server answers a reply only if it fails). `--max N` counts messages and requests; other kinds are shown
//         as {"event":"delivery","kind",...} and not counted. {"event":"going_away"} on a drain.
//   ask:  {"event":"ready",...}, {"event":"sent","message_ids":[json, bytes]}, {"event":"reply",
//         "payload","sender","correlation_id","kind"}.
//   any:  {"event":"error","reason","message"} on a failure; reason is an ErrorReason name (from an
//         error event, a failed reply, or the ErrorInfo of the stream's final status),
//         STATUS_<gRPC code> when a failed stream carries no ErrorInfo, or TIMEOUT / USAGE / INTERNAL
//         for the agent's own failures.
// Payloads print as their JSON value, or {"bytes_b64","content_type"} for a bytes body.
// Exit codes: 0 done (or SIGTERM/SIGINT), 1 error event or lost stream, 2 usage, 3 overall timeout.
//
// Field names are camelCase (keepCase: false): protobufjs bundles google/protobuf/struct.proto with
// camelCase fields whatever keepCase says, so camelCase is the only consistent choice.

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const EXIT_OK = 0;
const EXIT_ERROR = 1;
const EXIT_USAGE = 2;
const EXIT_TIMEOUT = 3;

// ---------------------------------------------------------------------------------------------
// Output

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

function fail(reason, message, code = EXIT_ERROR) {
  emit({ event: 'error', reason, message });
  process.stderr.write(`agent.mjs: ${reason}: ${message}\n`);
  process.exit(code);
}

// ---------------------------------------------------------------------------------------------
// google.protobuf.Value <-> plain JS values

/** A plain JSON-able JS value as a google.protobuf.Value object (for fromObject). */
function toValue(v) {
  if (v === null || v === undefined) return { nullValue: 'NULL_VALUE' };
  switch (typeof v) {
    case 'number':
      return { numberValue: v };
    case 'bigint':
      return { numberValue: Number(v) };
    case 'string':
      return { stringValue: v };
    case 'boolean':
      return { boolValue: v };
    case 'object':
      if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
      return { structValue: toStruct(v) };
    default:
      throw new TypeError(`cannot encode a ${typeof v} as google.protobuf.Value`);
  }
}

function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = toValue(v);
  return { fields };
}

/** A decoded google.protobuf.Value (toObject with oneofs: true) as a plain JS value. */
function fromValue(value) {
  if (value === null || value === undefined) return null;
  switch (value.kind) {
    case 'numberValue':
      return value.numberValue;
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return value.boolValue;
    case 'structValue':
      return fromStruct(value.structValue);
    case 'listValue':
      return (value.listValue?.values ?? []).map(fromValue);
    default: // 'nullValue', or no kind set at all: both mean null
      return null;
  }
}

function fromStruct(struct) {
  const out = {};
  for (const [k, v] of Object.entries(struct?.fields ?? {})) out[k] = fromValue(v);
  return out;
}

/** Payload message objects: a JSON body from a plain JS value, or bytes with a content type. */
function jsonPayload(v) {
  return { json: toValue(v) };
}

function bytesPayload(data, contentType) {
  return { data: Buffer.from(data), contentType };
}

/** A decoded Payload as something JSON can print. */
function decodePayload(payload) {
  if (!payload) return null;
  if (payload.body === 'json') return fromValue(payload.json);
  if (payload.body === 'data') {
    return { bytes_b64: Buffer.from(payload.data).toString('base64'), content_type: payload.contentType };
  }
  return null; // no body set
}

// ---------------------------------------------------------------------------------------------
// A stream that ends with a non-OK status carries google.rpc.Status in `grpc-status-details-bin`;
// its google.rpc.ErrorInfo (domain "agentpost") names the ErrorReason. Two tiny messages, declared
// here rather than loading googleapis' protos.

const RPC_TYPES = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
});

/** The ErrorInfo reason in a failed call's status details, or null. */
function statusReason(grpcErr) {
  const raw = grpcErr.metadata?.get('grpc-status-details-bin')?.[0];
  if (!raw) return null;
  try {
    const status = RPC_TYPES.lookupType('google.rpc.Status').decode(raw);
    for (const any of status.details) {
      if (any.type_url.endsWith('/google.rpc.ErrorInfo')) {
        return RPC_TYPES.lookupType('google.rpc.ErrorInfo').decode(any.value).reason || null;
      }
    }
  } catch (err) {
    process.stderr.write(`agent.mjs: undecodable grpc-status-details-bin: ${err}\n`);
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// The session: one Connect stream, operations matched to their answers by operation id.

class OperationError extends Error {
  constructor(err) {
    super(err.message || err.reason);
    this.reason = err.reason;
    this.code = err.code;
  }
}

class Session {
  constructor(stub, agentId, { onDelivery, onClosed }) {
    this.stub = stub;
    this.agentId = agentId;
    this.onDelivery = onDelivery;
    this.onClosed = onClosed;
    this.nextId = 1;
    this.pending = new Map(); // operation id -> {resolve, reject, waitReply, accepted}
    this.fireAndForget = new Set(); // ids of posted operations (answered only on failure)
    this.goingAway = null;
    this.call = null;
    this.closed = false;
  }

  /** Open the stream and introduce; resolves with the Welcome. */
  open() {
    this.call = this.stub.Connect();
    this.call.on('data', (frame) => this.#onFrame(frame));
    this.call.on('error', (err) => this.#onClosed(err));
    this.call.on('end', () => this.#onClosed(null));
    return this.#submit([{ introduce: { agentId: this.agentId } }])[0];
  }

  /** Send several operations in one frame; returns one promise per operation. */
  submitAll(ops) {
    return this.#submit(ops);
  }

  submit(op) {
    return this.#submit([op])[0];
  }

  // For operations the server answers only when they fail (reply, ack, keep-alive): written now;
  // a later error event for this id ends the session through onError.
  post(op) {
    const operationId = `op-${this.nextId++}`;
    this.fireAndForget.add(operationId);
    this.call.write({ operations: [{ operationId, ...op }] });
    return operationId;
  }

  close() {
    if (this.call) this.call.end();
  }

  #submit(ops) {
    const promises = [];
    const operations = ops.map((op) => {
      const operationId = `op-${this.nextId++}`;
      promises.push(
        new Promise((resolve, reject) => {
          this.pending.set(operationId, { resolve, reject, waitReply: 'request' in op, accepted: null });
        }),
      );
      return { operationId, ...op };
    });
    this.call.write({ operations });
    return promises;
  }

  #onFrame(frame) {
    for (const ev of frame.events) this.#onEvent(ev);
  }

  #onEvent(ev) {
    const waiter = this.pending.get(ev.operationId);
    switch (ev.event) {
      case 'welcome':
        this.#settle(ev.operationId, waiter, (w) => w.resolve(ev.welcome));
        break;
      case 'accepted':
        if (this.fireAndForget.delete(ev.operationId)) break; // an older server answers these too
        if (waiter?.waitReply) waiter.accepted = ev.accepted; // a request waits on for its reply
        else this.#settle(ev.operationId, waiter, (w) => w.resolve(ev.accepted));
        break;
      case 'reply':
        this.#settle(ev.operationId, waiter, (w) =>
          ev.reply.error ? w.reject(new OperationError(ev.reply.error)) : w.resolve(ev.reply),
        );
        break;
      case 'error':
        if (this.fireAndForget.has(ev.operationId)) {
          this.#closeWith(new OperationError(ev.error)); // a posted operation failed
        } else if (!ev.operationId) {
          this.#closeWith(new OperationError(ev.error)); // the server is closing the session
        } else {
          this.#settle(ev.operationId, waiter, (w) => w.reject(new OperationError(ev.error)));
        }
        break;
      case 'delivery':
        this.onDelivery(ev.delivery);
        break;
      case 'keepAlive':
        this.call.write({ operations: [{ operationId: '', keepAlive: {} }] });
        break;
      case 'goingAway':
        this.goingAway = ev.goingAway.reason || 'going away';
        emit({ event: 'going_away', reason: this.goingAway });
        break;
      default:
        process.stderr.write(`agent.mjs: ignoring unknown server event ${JSON.stringify(ev)}\n`);
    }
  }

  #settle(operationId, waiter, fn) {
    if (!waiter) {
      process.stderr.write(`agent.mjs: answer for unknown operation id ${JSON.stringify(operationId)}\n`);
      return;
    }
    this.pending.delete(operationId);
    fn(waiter);
  }

  #closeWith(err) {
    for (const w of this.pending.values()) w.reject(err);
    this.pending.clear();
    this.onClosed(err, this);
  }

  #onClosed(grpcErr) {
    if (this.closed) return;
    this.closed = true;
    let err = null;
    if (grpcErr) {
      const name = grpc.status[grpcErr.code] ?? String(grpcErr.code);
      const fallback = grpcErr.code === grpc.status.UNAVAILABLE ? 'ERROR_REASON_CONNECTION_LOST' : `STATUS_${name}`;
      err = new OperationError({
        reason: statusReason(grpcErr) ?? fallback,
        code: grpcErr.code,
        message: `stream failed with ${name}: ${(grpcErr.details || grpcErr.message).replace(/\s*Resolution note:\s*$/, '')}`,
      });
    } else if (this.pending.size > 0) {
      err = new OperationError({
        reason: 'ERROR_REASON_CONNECTION_LOST',
        message: 'the server ended the stream with operations unanswered',
      });
    }
    this.#closeWith(err);
  }
}

// ---------------------------------------------------------------------------------------------
// Scripts

async function runEcho(session, opts) {
  const max = opts.max === undefined ? Infinity : Number(opts.max);
  let handled = 0;
  let done = false;

  const finish = async () => {
    if (done) return;
    done = true;
    session.close();
    process.exit(EXIT_OK);
  };

  session.onDelivery = (env) => {
    if (done) return;
    const base = { sender: env.sender, id: env.id, payload: decodePayload(env.payload), headers: env.headers };
    if (env.kind === 'MESSAGE_KIND_REQUEST') {
      emit({ event: 'request', ...base });
      session.post({ reply: { correlationId: env.id, payload: jsonPayload({ echo: base.payload, from: 'node' }) } });
      emit({ event: 'replied', correlation_id: env.id });
    } else if (env.kind === 'MESSAGE_KIND_MESSAGE') {
      emit({ event: 'message', ...base });
    } else {
      emit({ event: 'delivery', kind: env.kind, ...base }); // a server EVENT: shown, not counted
      return;
    }
    handled += 1;
    if (handled >= max) finish();
  };
  session.onClosed = (err, s) => {
    if (done) return;
    if (s.goingAway) process.exit(EXIT_OK); // the server is draining: a clean end for a responder
    if (err) fail(err.reason, err.message);
    fail('ERROR_REASON_CONNECTION_LOST', 'the server ended the stream');
  };

  const welcome = await session.open();
  emit({ event: 'ready', session_id: welcome.sessionId, server_id: welcome.serverId });
  if (max <= 0) await finish();
  await new Promise(() => {}); // deliveries, signals or the timeout end the process
}

async function runAsk(session, opts) {
  if (!opts.to) fail('USAGE', '--script ask needs --to TARGET', EXIT_USAGE);
  let done = false;
  session.onDelivery = (env) => {
    emit({ event: 'delivery', kind: env.kind, sender: env.sender, id: env.id, payload: decodePayload(env.payload) });
  };
  session.onClosed = (err) => {
    if (done) return;
    if (err) fail(err.reason, err.message);
    fail('ERROR_REASON_CONNECTION_LOST', 'the server ended the stream before the reply');
  };

  const welcome = await session.open();
  emit({ event: 'ready', session_id: welcome.sessionId, server_id: welcome.serverId });

  const headers = { 'x-client': 'node' };
  const accepted = await Promise.all(
    session.submitAll([
      {
        send: {
          to: opts.to,
          headers,
          payload: jsonPayload({ hello: 'from node', n: 1, nested: { list: [1, 'two', true, null] } }),
        },
      },
      { send: { to: opts.to, headers, payload: bytesPayload('raw-bytes', 'text/plain') } },
    ]),
  );
  emit({ event: 'sent', message_ids: accepted.map((a) => a.messageId) });

  const reply = await session.submit({
    request: { to: opts.to, headers, payload: jsonPayload({ question: 'ping' }), timeout: { seconds: 5 } },
  });
  emit({
    event: 'reply',
    payload: decodePayload(reply.payload),
    sender: reply.sender,
    correlation_id: reply.correlationId,
    kind: reply.kind,
  });
  done = true;
  session.close();
  process.exit(EXIT_OK);
}

const SCRIPTS = { echo: runEcho, ask: runAsk };

// ---------------------------------------------------------------------------------------------
// Entry point

function loadStub(protosDir, server) {
  const definition = protoLoader.loadSync('agentpost/v1/messaging.proto', {
    includeDirs: [protosDir],
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition);
  return new pkg.agentpost.v1.AgentMessaging(server, grpc.credentials.createInsecure());
}

async function main() {
  let opts;
  try {
    ({ values: opts } = parseArgs({
      options: {
        server: { type: 'string' },
        'agent-id': { type: 'string' },
        script: { type: 'string' },
        to: { type: 'string' },
        max: { type: 'string' },
        timeout: { type: 'string', default: '20' },
        protos: { type: 'string', default: path.resolve(HERE, '../../protos') },
      },
      strict: true,
    }));
  } catch (err) {
    fail('USAGE', err.message, EXIT_USAGE);
  }
  const script = SCRIPTS[opts.script];
  if (!opts.server || !opts['agent-id'] || !script) {
    fail('USAGE', 'usage: agent.mjs --server HOST:PORT --agent-id ID --script echo|ask [--to T] [--max N] [--timeout S]', EXIT_USAGE);
  }
  for (const name of ['max', 'timeout']) {
    if (opts[name] !== undefined && !(Number(opts[name]) >= 0)) fail('USAGE', `--${name} must be a number >= 0`, EXIT_USAGE);
  }

  const timeout = Number(opts.timeout);
  if (timeout > 0) {
    setTimeout(
      () => fail('TIMEOUT', `script ${opts.script} did not finish within ${timeout} s`, EXIT_TIMEOUT),
      timeout * 1000,
    );
  }

  const stub = loadStub(opts.protos, opts.server);
  const session = new Session(stub, opts['agent-id'], { onDelivery: () => {}, onClosed: () => {} });
  for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => {
      session.close();
      process.exit(EXIT_OK);
    });
  }
  await script(session, opts);
}

main().catch((err) => {
  if (err instanceof OperationError) fail(err.reason, err.message);
  fail('INTERNAL', err?.stack || String(err));
});
