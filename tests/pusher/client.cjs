// The unmodified pusher-js client (node build) against the live service's Pusher endpoint, for tests/test_pusher.py.
//
// argv[2]: JSON {key, host, port, authEndpoint, authToken, channels, badAuthChannel}. Every event of every
// channel, connection state change and error is written to stdout as one JSON line; the book of each market
// channel is kept from its price-update events (each one replaces the book). stdin commands, one per line:
// "report" prints {"t": "report", "books": ...}; "quit" disconnects and exits.
"use strict";

const readline = require("node:readline");
const Pusher = require("pusher-js");

const opts = JSON.parse(process.argv[2]);
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const books = {};

function connect(name, authorization) {
  const pusher = new Pusher(opts.key, {
    cluster: "local", // required by pusher-js 8; unused when wsHost is given
    wsHost: opts.host,
    wsPort: opts.port,
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: authorization,
  });
  pusher.connection.bind("state_change", (s) => out({ t: "state", client: name, state: s.current }));
  pusher.connection.bind("error", (e) => out({ t: "error", client: name, error: e && e.data ? e.data : String(e) }));
  return pusher;
}

function follow(pusher, client, channelName) {
  const ch = pusher.subscribe(channelName);
  ch.bind("pusher:subscription_succeeded", () => out({ t: "subscribed", client, channel: channelName }));
  ch.bind("pusher:subscription_error", (e) => out({ t: "subscription_error", client, channel: channelName, error: e }));
  ch.bind_global((event, data) => {
    if (event.startsWith("pusher:")) return;
    if (event === "price-update") {
      books[channelName] = { bids: data.bids, asks: data.asks, seq: data.seq, block: data.block };
    }
    out({ t: "event", client, channel: channelName, event, data });
  });
}

const main = connect("main", {
  endpoint: opts.authEndpoint,
  transport: "ajax",
  headers: { Authorization: "Bearer " + opts.authToken },
});
for (const name of opts.channels) follow(main, "main", name);

let bad = null;
if (opts.badAuthChannel) {
  // A client whose authorizer returns a signature the app secret did not make.
  bad = connect("bad", {
    customHandler: (_params, callback) => callback(null, { auth: opts.key + ":" + "0".repeat(64) }),
  });
  follow(bad, "bad", opts.badAuthChannel);
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = line.trim();
  if (cmd === "report") {
    out({ t: "report", books, state: main.connection.state });
  } else if (cmd === "quit") {
    main.disconnect();
    if (bad) bad.disconnect();
    out({ t: "bye" });
    setTimeout(() => process.exit(0), 100);
  }
});
