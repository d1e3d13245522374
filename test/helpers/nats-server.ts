export * from "../../scripts/lib/nats-server.js";
