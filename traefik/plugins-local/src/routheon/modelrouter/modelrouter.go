// Package modelrouter is Routheon's Traefik middleware for "one key, many models", and the
// guard in front of every key's llama-server.
//
// With key tables (routheon-grants.yml) it checks the request's single `Authorization: Bearer
// KEY` against a table of key hashes, reads the JSON body's "model", picks the one service of
// the key that declares that model and names it in the X-Routheon-Service header. The router
// using this middleware proxies to Traefik's own loopback entry point "routheon-hop", whose
// routers match that header. With `keysInRule` (a key file's routers, and the hop routers)
// the router's rule has matched the key already, and the middleware only guards.
//
// Either way a key reaches llama-server's inference API only (allowed below, plus the paths a
// key file opens with `allowPaths`), and a request body is read whole, at most
// maxRequestBodyBytes, before the request goes on. Every refusal is an OpenAI error object.
// Design and cost: docs/model-routing.md.
//
// Traefik interprets this file with Yaegi; the calls into the standard library (sha256,
// encoding/json, io, bytes) run compiled, so per-request cost is dominated by them, not by
// Yaegi: no loop here runs once per byte of a body.
package modelrouter

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path"
	"strconv"
	"strings"
	"unicode/utf8"
)

// HopHeader names the chosen service; the hop entry point's routers match it. Any copy the
// client sent is deleted first, so no client header can steer routing.
const HopHeader = "X-Routheon-Service"

// DefaultMaxRequestBodyBytes applies when the configuration sets no limit. Routheon writes
// the same value into every configuration (MAX_REQUEST_BODY_BYTES in
// src/routheon/mappings/format.py): room for a chat request with a few images in base64.
const DefaultMaxRequestBodyBytes = 64 << 20

// A body is read in pieces of firstPiece, then twice that each, up to maxPiece (readBody).
const (
	firstPiece = 32 << 10
	maxPiece   = 4 << 20
)

const bearer = "Bearer "

// inference holds llama-server's inference endpoints outside /v1/ (llama.cpp
// tools/server/server.cpp, 11434), any method; readOnly those whose POST changes the server
// (POST /props sets its options, POST /models loads models in router mode).
var (
	inference = map[string]bool{
		"/completion": true, "/completions": true, "/chat/completions": true, "/responses": true,
		"/infill": true, "/embedding": true, "/embeddings": true, "/rerank": true, "/reranking": true,
		"/tokenize": true, "/detokenize": true, "/apply-template": true, "/audio/transcriptions": true,
		"/chat/completions/input_tokens": true, "/responses/input_tokens": true,
	}
	readOnly = map[string]bool{"/health": true, "/models": true, "/props": true}
)

// openAI is the prefix of the OpenAI-compatible API, every path of which is inference.
const openAI = "/v1/"

// Config is the middleware's configuration, written by Routheon into routheon-grants.yml and
// into each key file. The tables are text, one entry per line: Traefik hands a string over as
// it is, where a YAML mapping of 10,000 keys would be decoded node by node.
type Config struct {
	// Services holds "NAME MODEL..." lines: the model names each service answers.
	Services string `json:"services,omitempty"`
	// Keys holds "SHA256-HEX HINT SERVICE..." lines; the hint is for listings only.
	Keys string `json:"keys,omitempty"`
	// KeysInRule: the router's rule has matched the key; no key table is consulted.
	KeysInRule bool `json:"keysInRule,omitempty"`
	// AllowPaths opens more of llama-server than its inference API: whitespace-separated
	// paths, each with everything below it ("/slots" opens /slots and /slots/0).
	AllowPaths string `json:"allowPaths,omitempty"`
	// MaxRequestBodyBytes bounds each request body; unset or 0: DefaultMaxRequestBodyBytes.
	MaxRequestBodyBytes int64 `json:"maxRequestBodyBytes,omitempty"`
}

// CreateConfig returns an empty configuration for Traefik to decode into.
func CreateConfig() *Config {
	return &Config{}
}

type service struct {
	name   string
	models map[string]bool
}

// ModelRouter is the middleware: an immutable table built once per configuration.
type ModelRouter struct {
	next       http.Handler
	keysInRule bool
	keys       map[string][]*service
	allowed    []string
	limit      int64
}

// New parses the tables; an unknown service or a malformed line is an error (Traefik then
// disables the router and logs why) rather than a key that silently routes elsewhere.
func New(_ context.Context, next http.Handler, config *Config, name string) (http.Handler, error) {
	limit := config.MaxRequestBodyBytes
	if limit == 0 {
		limit = DefaultMaxRequestBodyBytes
	}
	if limit < 0 {
		return nil, fmt.Errorf("%s: maxRequestBodyBytes must be positive, not %d", name, limit)
	}
	allowed := strings.Fields(config.AllowPaths)
	for _, prefix := range allowed {
		if !strings.HasPrefix(prefix, "/") {
			return nil, fmt.Errorf("%s: allowPaths: %q does not start with /", name, prefix)
		}
	}
	router := &ModelRouter{next: next, keysInRule: config.KeysInRule, allowed: allowed, limit: limit}
	if config.KeysInRule {
		if strings.TrimSpace(config.Keys) != "" || strings.TrimSpace(config.Services) != "" {
			return nil, fmt.Errorf("%s: keysInRule takes no key or service table", name)
		}
		return router, nil
	}
	services := map[string]*service{}
	for number, line := range strings.Split(config.Services, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if services[fields[0]] != nil {
			return nil, fmt.Errorf("%s: services line %d: service %q is declared twice", name, number+1, fields[0])
		}
		entry := &service{name: fields[0], models: map[string]bool{}}
		for _, model := range fields[1:] {
			entry.models[model] = true
		}
		services[fields[0]] = entry
	}
	keys := map[string][]*service{}
	for number, line := range strings.Split(config.Keys, "\n") {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if len(fields) < 3 || len(fields[0]) != sha256.Size*2 {
			return nil, fmt.Errorf("%s: keys line %d: expected SHA256-HEX HINT SERVICE...", name, number+1)
		}
		granted := make([]*service, 0, len(fields)-2)
		for _, serviceName := range fields[2:] {
			entry := services[serviceName]
			if entry == nil {
				return nil, fmt.Errorf("%s: keys line %d: service %q is not declared", name, number+1, serviceName)
			}
			granted = append(granted, entry)
		}
		keys[fields[0]] = granted
	}
	router.keys = keys
	return router, nil
}

func (m *ModelRouter) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	var granted []*service
	if !m.keysInRule {
		req.Header.Del(HopHeader)
		// Exactly one Authorization header: with two, Traefik's Header matcher accepts either
		// one, and which one a backend reads is up to the backend.
		values := req.Header.Values("Authorization")
		if len(values) != 1 || !strings.HasPrefix(values[0], bearer) {
			writeError(rw, http.StatusUnauthorized, "Invalid API key.", "invalid_api_key")
			return
		}
		sum := sha256.Sum256([]byte(values[0][len(bearer):]))
		granted = m.keys[hex.EncodeToString(sum[:])]
		if len(granted) == 0 {
			writeError(rw, http.StatusUnauthorized, "Invalid API key.", "invalid_api_key")
			return
		}
	}
	if !m.allows(req) {
		writeError(rw, http.StatusForbidden, fmt.Sprintf(
			"This API key may use the model server's inference API only: %s %s is not part of it.",
			req.Method, shorten(req.URL.Path)), "path_not_allowed")
		return
	}
	// Refused before a byte of it is read: a claimed size is never allocated.
	if req.ContentLength > m.limit {
		m.tooLarge(rw)
		return
	}
	// The body is read whole even when no model is needed: Go's net/http (Traefik's proxy)
	// otherwise cuts about one stream in fifty under CPU load (traefik/traefik.yml). Only the
	// request is buffered; the answer streams through.
	pieces, err := m.readBody(req)
	if err == errTooLarge {
		m.tooLarge(rw)
		return
	}
	if err != nil {
		writeError(rw, http.StatusBadRequest, "The request body could not be read.", "invalid_body")
		return
	}
	if m.keysInRule {
		setBody(req, pieces)
		m.serveReplaying(rw, req) // the connection to llama-server: replay.go
		return
	}
	// One service without declared models: today's behaviour, whatever the body says.
	if len(granted) == 1 && len(granted[0].models) == 0 {
		setBody(req, pieces)
		m.forward(rw, req, granted[0])
		return
	}
	// The model's JSON decoder needs one piece; most bodies arrive in one (firstPiece). The
	// pieces are garbage once joined, but until Go collects them Traefik holds the body
	// twice (docs/production.md, "Request size and paths").
	var body []byte
	if len(pieces) == 1 {
		body = pieces[0]
	} else if len(pieces) > 1 {
		body = bytes.Join(pieces, nil)
	}
	setBody(req, [][]byte{body})
	model, present, problem := bodyModel(body)
	if problem != "" {
		writeError(rw, http.StatusBadRequest, problem, "invalid_request_body")
		return
	}
	if !present {
		if len(granted) == 1 {
			m.forward(rw, req, granted[0]) // GET /health, /props, ... of its one service
			return
		}
		writeError(rw, http.StatusBadRequest,
			"This API key may use several models: name one in the request body's \"model\" field.", "model_required")
		return
	}
	for _, entry := range granted {
		if entry.models[model] {
			m.forward(rw, req, entry)
			return
		}
	}
	writeError(rw, http.StatusNotFound,
		fmt.Sprintf("The model %q does not exist or this API key may not use it.", shorten(model)), "model_not_found")
}

// allows says whether the request is for the inference API or a path the configuration opens.
// A path that cleaning would change (dot segments, doubled slashes) is refused: the check
// and the backend must read the same path.
func (m *ModelRouter) allows(req *http.Request) bool {
	clean := path.Clean(req.URL.Path)
	if clean != req.URL.Path && clean+"/" != req.URL.Path {
		return false
	}
	for _, prefix := range m.allowed {
		if clean == prefix || strings.HasPrefix(clean, strings.TrimSuffix(prefix, "/")+"/") {
			return true
		}
	}
	if strings.HasPrefix(clean, openAI) || inference[clean] {
		return true
	}
	return readOnly[clean] && (req.Method == http.MethodGet || req.Method == http.MethodHead)
}

func (m *ModelRouter) forward(rw http.ResponseWriter, req *http.Request, entry *service) {
	req.Header.Set(HopHeader, entry.name)
	m.next.ServeHTTP(rw, req)
}

func (m *ModelRouter) tooLarge(rw http.ResponseWriter) {
	// the connection is closed after the answer: the rest of the body is never read
	rw.Header().Set("Connection", "close")
	writeError(rw, http.StatusRequestEntityTooLarge, fmt.Sprintf(
		"The request body is larger than %s, the most this endpoint accepts.", size(m.limit)), "request_too_large")
}

var errTooLarge = fmt.Errorf("request body too large")

// readBody reads the request body whole, at most m.limit bytes, in pieces: nil when there is
// none, errTooLarge when the client sends more.
//
// Pieces rather than one buffer that doubles: a doubling buffer leaves its earlier sizes
// behind, and Traefik then held twice the limit for one refused upload (measured). Each
// piece is twice the one before, from firstPiece up to maxPiece, never more than the limit
// or the Content-Length leave room for, and allocated only once the bytes before it have
// arrived: a client that claims a large body and sends a few bytes costs a few bytes.
func (m *ModelRouter) readBody(req *http.Request) ([][]byte, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return nil, nil
	}
	defer req.Body.Close()
	var pieces [][]byte
	var total int64
	next := int64(firstPiece)
	for {
		size := next
		if left := m.limit - total; size > left {
			size = left
		}
		if req.ContentLength > total && size > req.ContentLength-total {
			size = req.ContentLength - total
		}
		if size == 0 || total == req.ContentLength {
			// at the limit or at the Content-Length: one more byte says whether the body goes on
			var probe [1]byte
			n, err := io.ReadFull(req.Body, probe[:])
			if n == 0 && err == io.EOF {
				return pieces, nil
			}
			if n > 0 && total >= m.limit {
				return nil, errTooLarge
			}
			if err == nil {
				err = fmt.Errorf("request body longer than its Content-Length")
			}
			return nil, err
		}
		piece := make([]byte, size)
		n, err := io.ReadFull(req.Body, piece)
		if n > 0 {
			pieces = append(pieces, piece[:n])
			total += int64(n)
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return pieces, nil
		}
		if err != nil {
			return nil, err
		}
		if next < maxPiece {
			next *= 2
		}
	}
}

// setBody makes the pieces the request's body, replayable for Traefik's proxy: GetBody, and
// marked idempotent for Go's transport, which then resends it on a reused connection that
// turns out closed (replay.go).
func setBody(req *http.Request, pieces [][]byte) {
	var length int64
	for _, piece := range pieces {
		length += int64(len(piece))
	}
	open := func() (io.ReadCloser, error) {
		readers := make([]io.Reader, len(pieces))
		for index, piece := range pieces {
			readers[index] = bytes.NewReader(piece)
		}
		return io.NopCloser(io.MultiReader(readers...)), nil
	}
	req.Body, _ = open()
	req.GetBody = open
	req.ContentLength = length
	req.TransferEncoding = nil
	if _, sent := req.Header[idempotencyKey]; !sent {
		req.Header[idempotencyKey] = nil
	}
	if length == 0 {
		req.Body = http.NoBody
	}
}

// modelField receives the top-level "model" of a body without copying anything else:
// encoding/json skips every field that matches no struct field. It matches field names
// exactly first and then case-insensitively, so a name that differs from "model" only in
// case ("MODEL") would land in Model; Variant, declared first, takes every such name instead,
// and as an empty struct it keeps nothing of their values.
type modelField struct {
	Variant struct{}        `json:"mODEL"`
	Model   json.RawMessage `json:"model"`
}

// bodyModel returns the top-level "model" of a JSON object body, whether it is there, and
// what is wrong with the body if it cannot be routed. It reads the body as llama-server does
// (nlohmann::json): escapes decoded ("\u0061lpha" is "alpha"), the last of duplicate fields
// wins (checked against llama-server 11434's /tokenize), invalid UTF-8 refused, field names
// case-sensitive ("MODEL" is not "model").
func bodyModel(body []byte) (string, bool, string) {
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	if len(trimmed) == 0 {
		return "", false, ""
	}
	if !utf8.Valid(body) {
		return "", false, "The request body is not valid UTF-8."
	}
	if trimmed[0] != '{' {
		return "", false, "The request body is not a JSON object."
	}
	var fields modelField
	if err := json.Unmarshal(body, &fields); err != nil {
		// a value under a name like "MODEL" that is no object does not fit Variant: fine
		if _, misfit := err.(*json.UnmarshalTypeError); !misfit {
			return "", false, "The request body is not a JSON object."
		}
	}
	raw := fields.Model
	if raw == nil {
		return "", false, ""
	}
	// null decodes into a string without an error: insist on a JSON string
	var model string
	if len(raw) == 0 || raw[0] != '"' || json.Unmarshal(raw, &model) != nil {
		return "", false, "The request body's \"model\" must be a string."
	}
	return model, true, ""
}

func shorten(text string) string {
	if len(text) > 200 {
		return text[:200] + "..."
	}
	return text
}

// size names a byte count the way the documentation does (64 MiB).
func size(bytes int64) string {
	if bytes%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", bytes>>20)
	}
	return fmt.Sprintf("%d bytes", bytes)
}

// writeError answers an OpenAI error object, like routheon-server's /errors pages.
func writeError(rw http.ResponseWriter, status int, message, code string) {
	body, _ := json.Marshal(map[string]map[string]string{
		"error": {"message": message, "type": "invalid_request_error", "code": code},
	})
	rw.Header().Set("Content-Type", "application/json")
	rw.Header().Set("Content-Length", strconv.Itoa(len(body)))
	rw.WriteHeader(status)
	rw.Write(body)
}
