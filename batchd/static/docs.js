// Starts the vendored Swagger UI on this server's OpenAPI document. An
// external file, not an inline script, so the page's CSP can forbid those.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    defaultModelsExpandDepth: 1,
    defaultModelExpandDepth: 2,
    persistAuthorization: false,
    tryItOutEnabled: false
  });
});
