// A Node.js client of holdfast's InventoryService, for tests/test_node_client.py.
//
//   node client.js PLAN.json
//
// It reads the generated service config (service/generated/service_config.json)
// as it is and gives it to @grpc/grpc-js as the channel option
// `grpc.service_config`, the way any non-Python client would: no deadline and
// no retry loop here, so every deadline and retry seen comes from the contracts.
//
// PLAN.json:
//   {"target": "127.0.0.1:PORT",
//    "protos": "DIR",                      the include folder of holdfast's protos
//    "config": "FILE",                     the service config of every call...
//    "calls": [{"method": "GetStock", "request": {...},
//               "config": "FILE"}]}        ...unless a call names its own
//
// Prints one JSON line per call, in order, made one after the other:
//   {"method", "code" (a status name, "OK" for a reply), "details",
//    "elapsed_ms" (the client's own measure), "reply" (or null)}
// Exits 0 when every call was made, whatever its status; 2 on a bad plan.

'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = 'holdfast/inventory/v1/inventory.proto';
const SERVICE = 'holdfast.inventory.v1.InventoryService';

function load(protos) {
  // google/protobuf/descriptor.proto (which the contract option extends) comes
  // with proto-loader's bundled well-known types; `protos` resolves
  // holdfast/contract/v1/contract.proto.
  const definition = protoLoader.loadSync(PROTO, {
    includeDirs: [protos],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  return SERVICE.split('.').reduce((found, name) => found[name], grpc.loadPackageDefinition(definition));
}

function call(client, method, request) {
  const started = process.hrtime.bigint();
  return new Promise((resolve) => {
    client[method](request, (error, reply) => {
      const elapsed_ms = Number(process.hrtime.bigint() - started) / 1e6;
      if (error) {
        resolve({ method, code: grpc.status[error.code], details: error.details, elapsed_ms, reply: null });
      } else {
        resolve({ method, code: 'OK', details: '', elapsed_ms, reply });
      }
    });
  });
}

async function main(argv) {
  if (argv.length !== 1) {
    process.stderr.write('usage: node client.js PLAN.json\n');
    return 2;
  }
  const plan = JSON.parse(fs.readFileSync(argv[0], 'utf8'));
  const Service = load(path.resolve(plan.protos));
  const clients = new Map(); // one channel per service config file
  for (const { method, request, config = plan.config } of plan.calls) {
    if (!clients.has(config)) {
      const options = { 'grpc.service_config': fs.readFileSync(config, 'utf8') };
      clients.set(config, new Service(plan.target, grpc.credentials.createInsecure(), options));
    }
    process.stdout.write(JSON.stringify(await call(clients.get(config), method, request)) + '\n');
  }
  for (const client of clients.values()) client.close();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => { process.exitCode = code; },
  (error) => { process.stderr.write(`${error.stack || error}\n`); process.exitCode = 2; },
);
