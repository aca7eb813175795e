// @hey-api/openapi-ts: the TypeScript client generated from falgate's /openapi.json
// (written to openapi.json by tests/openapi/test_generated_clients.py).
export default {
  input: "openapi.json",
  output: { path: "generated", module: { extension: ".js" } },
  plugins: ["@hey-api/client-fetch", "@hey-api/typescript", "@hey-api/sdk"],
};
