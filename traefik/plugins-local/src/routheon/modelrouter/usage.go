// Usage accounting: one JSON line per request of a known key, written by Traefik itself.
//
// The middleware wraps the ResponseWriter of every request it forwards or refuses for a known
// key, reads the tokens from the answer's tail as it passes (nothing is buffered: each Write
// goes on at once and is flushed), and hands one record per request to the folder's writer.
// Design and record format: docs/usage.md.
//
// Written for Yaegi: per request and per Write only a few statements run interpreted; the
// scanning (bytes.LastIndex) and decoding (encoding/json) run compiled.
package modelrouter

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	// What a Write keeps of the previous one: a key split across two writes is found.
	carrySize = 64
	// At most this much of a usage object (or count) split across writes is kept: llama-server's
	// is about 150 bytes.
	captureLimit = 4096
	// While the usage event is taken out of a stream, an unfinished event is held until its end;
	// one longer than this is no event Routheon knows, and the stream is passed on unparsed.
	eventLimit = 64 << 10
	// The writer wakes for new records at most this often: records reach the file about this
	// long after their request ended, and a busy Traefik writes one batch per pause.
	flushPause = 50 * time.Millisecond
	// Records waiting for a stuck disk beyond this many bytes are dropped (and said so).
	pendingLimit = 16 << 20
	// A failing folder is reported on stderr (Traefik's log) at most this often.
	complaintEvery = time.Minute
	// Traefik's status for a request whose client went away before the answer started.
	statusClientClosed = 499
)

var (
	usageKey     = []byte(`"usage":`)
	evaluatedKey = []byte(`"tokens_evaluated":`)
	predictedKey = []byte(`"tokens_predicted":`)
	// the end of an OpenAI-style stream: a client may hang up once it has it, before the proxy
	// has read the end of the answer
	doneEvent = []byte("data: [DONE]")
	// llama-server's usage event of a stream: `data: {"choices":[],...,"usage":{...}}`; json.dumps
	// (Python backends) writes a space after the colon
	emptyChoices = [][]byte{[]byte(`"choices":[]`), []byte(`"choices": []`)}
	eventEnds    = [][]byte{[]byte("\n\n"), []byte("\r\n\r\n")}
	// OpenAI-style streams llama-server sends usage in only when asked (llama.cpp #16052).
	streamPaths = map[string]bool{
		"/v1/chat/completions": true, "/v1/completions": true, "/chat/completions": true, "/completions": true,
	}
	processID = strconv.Itoa(os.Getpid())
)

// usageLogs holds one writer per folder for the whole process: Traefik builds the middleware
// anew on every configuration reload, and a writer per instance would leak a goroutine each time.
var (
	usageLogsMu   sync.Mutex
	usageLogs     = map[string]*usageLog{}
	watchShutdown sync.Once
)

// usageLog queues whole lines per UTC day and appends them to <folder>/<day>.<pid>.jsonl.
type usageLog struct {
	folder  string
	wake    chan struct{}
	mu      sync.Mutex
	pending map[string][]byte
	size    int
	dropped int
	// set once Traefik is told to stop: each record is then written before its request ends
	direct   bool
	writeMu  sync.Mutex
	lastSaid time.Time
}

// openUsage returns the writer for folder ("" turns accounting off).
func openUsage(folder string) (*usageLog, error) {
	if folder == "" {
		return nil, nil
	}
	if !filepath.IsAbs(folder) {
		return nil, fmt.Errorf("usage: %q is not an absolute path", folder)
	}
	folder = filepath.Clean(folder)
	watchShutdown.Do(flushOnShutdown)
	usageLogsMu.Lock()
	defer usageLogsMu.Unlock()
	log := usageLogs[folder]
	if log == nil {
		log = &usageLog{folder: folder, wake: make(chan struct{}, 1), pending: map[string][]byte{}}
		usageLogs[folder] = log
		go log.run()
	}
	return log, nil
}

// flushOnShutdown writes what waits when Traefik gets SIGTERM or SIGINT, and every later record
// at once: Traefik then finishes the requests in flight and exits without a word to plugins.
func flushOnShutdown() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, sigterm())
	go func() {
		<-signals
		usageLogsMu.Lock()
		logs := make([]*usageLog, 0, len(usageLogs))
		for _, log := range usageLogs {
			logs = append(logs, log)
		}
		usageLogsMu.Unlock()
		for _, log := range logs {
			log.mu.Lock()
			log.direct = true
			log.mu.Unlock()
			log.flush()
		}
	}()
}

// sigterm is syscall.SIGTERM, made from os.Kill's type: Traefik gives plugins no syscall
// package (only with useUnsafe), and os names no other signal than Interrupt and Kill.
func sigterm() os.Signal {
	signal := reflect.New(reflect.TypeOf(os.Kill)).Elem()
	signal.SetInt(15)
	return signal.Interface().(os.Signal)
}

func (l *usageLog) add(day string, line []byte) {
	l.mu.Lock()
	if l.direct {
		l.mu.Unlock()
		l.write(day, line)
		return
	}
	if l.size+len(line) > pendingLimit {
		l.dropped++
		l.mu.Unlock()
		return
	}
	l.pending[day] = append(l.pending[day], line...)
	l.size += len(line)
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

func (l *usageLog) run() {
	for range l.wake {
		l.flush()
		time.Sleep(flushPause)
	}
}

func (l *usageLog) flush() {
	l.mu.Lock()
	batch, dropped := l.pending, l.dropped
	l.pending, l.size, l.dropped = map[string][]byte{}, 0, 0
	l.mu.Unlock()
	if dropped > 0 {
		l.complain(fmt.Errorf("more than %d bytes of records waited to be written", pendingLimit), dropped)
	}
	for day, lines := range batch {
		l.write(day, lines)
	}
}

// write appends whole lines with one call on a file opened for it (O_APPEND): a file removed
// or moved away meanwhile is simply started again, and two writers never mix their lines.
func (l *usageLog) write(day string, lines []byte) {
	l.writeMu.Lock()
	defer l.writeMu.Unlock()
	path := filepath.Join(l.folder, day+"."+processID+".jsonl")
	file, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if os.IsNotExist(err) {
		if err = os.MkdirAll(l.folder, 0o750); err == nil {
			file, err = os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		}
	}
	if err == nil {
		_, err = file.Write(lines)
		if closeErr := file.Close(); err == nil {
			err = closeErr
		}
	}
	if err != nil {
		l.complain(err, bytes.Count(lines, []byte("\n")))
	}
}

// complain says on stderr (Traefik's log) that records were lost, at most once a minute.
// Requests never notice: they were answered before their records were written.
func (l *usageLog) complain(err error, lost int) {
	if time.Since(l.lastSaid) < complaintEvery {
		return
	}
	l.lastSaid = time.Now()
	fmt.Fprintf(os.Stderr, "routheon: usage records lost (%d, more unreported for a minute): %v\n", lost, err)
}

// record is one line of a usage file; the fields are in the documented order.
type record struct {
	Time             string  `json:"time"`
	DurationMs       float64 `json:"duration_ms"`
	Key              string  `json:"key"`
	Hint             string  `json:"hint"`
	Name             string  `json:"name"`
	Model            string  `json:"model"`
	Service          string  `json:"service"`
	Method           string  `json:"method"`
	Path             string  `json:"path"`
	Code             int     `json:"code"`
	Stream           bool    `json:"stream"`
	PromptTokens     *int64  `json:"prompt_tokens"`
	CompletionTokens *int64  `json:"completion_tokens"`
	Outcome          string  `json:"outcome"`
}

// requestFacts is what a record needs from the request body, and include_usage's injection.
type requestFacts struct {
	model      string
	stream     bool
	askedUsage bool
	options    json.RawMessage
	body       []byte
}

// readFacts reads the body again (readBody left it in memory) as llama-server reads it: field
// names case-sensitive, the last of duplicate fields wins.
func readFacts(req *http.Request) requestFacts {
	facts := requestFacts{}
	if req.GetBody == nil {
		return facts
	}
	reader, err := req.GetBody()
	if err != nil {
		return facts
	}
	var buffer bytes.Buffer
	if req.ContentLength > 0 {
		buffer.Grow(int(req.ContentLength))
	}
	if _, err := io.Copy(&buffer, reader); err != nil {
		return facts
	}
	facts.body = buffer.Bytes()
	var fields map[string]json.RawMessage
	if json.Unmarshal(facts.body, &fields) != nil {
		return facts
	}
	if raw := fields["model"]; len(raw) > 0 && raw[0] == '"' {
		json.Unmarshal(raw, &facts.model)
	}
	facts.stream = string(fields["stream"]) == "true"
	facts.options = fields["stream_options"]
	var options map[string]json.RawMessage
	if json.Unmarshal(facts.options, &options) == nil {
		facts.askedUsage = string(options["include_usage"]) == "true"
	}
	return facts
}

// withUsageAsked is the body with stream_options.include_usage set (other options kept), or
// nil when stream_options is there but no object. The new field goes last: llama-server takes
// the last of duplicate fields.
func (facts requestFacts) withUsageAsked() []byte {
	options := map[string]json.RawMessage{}
	if len(facts.options) > 0 && json.Unmarshal(facts.options, &options) != nil {
		return nil
	}
	options["include_usage"] = json.RawMessage("true")
	added, err := json.Marshal(options)
	body := bytes.TrimRight(facts.body, " \t\r\n")
	if err != nil || len(body) < 2 || body[len(body)-1] != '}' {
		return nil
	}
	result := make([]byte, 0, len(body)+len(added)+20)
	result = append(result, body[:len(body)-1]...)
	result = append(result, `,"stream_options":`...)
	result = append(result, added...)
	return append(result, '}')
}

// tokenField follows the last occurrence of one key ("usage":, "tokens_evaluated":) in an
// answer and keeps its value once complete.
type tokenField struct {
	key   []byte
	held  []byte
	value json.RawMessage
}

// feed looks at one write; joint is the carry-over of the previous writes (carried bytes)
// followed by the start of p, for a key split across the two.
func (f *tokenField) feed(joint []byte, carried int, p []byte) {
	if at := bytes.LastIndex(p, f.key); at >= 0 {
		f.held = append(f.held[:0], p[at:]...)
	} else if at := bytes.LastIndex(joint, f.key); at >= 0 && at < carried && at+len(f.key) > carried {
		f.held = append(append(f.held[:0], joint[at:carried]...), p...)
	} else if len(f.held) > 0 {
		f.held = append(f.held, p...)
	} else {
		return
	}
	f.settle(false)
}

// settle takes the held value once it is complete. A number must be followed by something
// (its next digits may be in the next write) unless the answer is over (final).
func (f *tokenField) settle(final bool) {
	if len(f.held) == 0 {
		return
	}
	if len(f.held) > captureLimit {
		f.held = f.held[:captureLimit]
	}
	text := f.held[len(f.key):]
	decoder := json.NewDecoder(bytes.NewReader(text))
	var value json.RawMessage
	err := decoder.Decode(&value)
	if err == nil && (final || value[0] == '{' || int(decoder.InputOffset()) < len(text)) {
		if string(value) != "null" {
			f.value = value
		}
		f.held = f.held[:0]
		return
	}
	if final || len(f.held) >= captureLimit || (err != nil && err != io.ErrUnexpectedEOF && err != io.EOF) {
		f.held = f.held[:0]
	}
}

// tailScan finds the tokens in an answer as it passes, keeping only a few bytes of it.
type tailScan struct {
	carry     []byte
	joint     []byte
	usage     tokenField
	evaluated tokenField
	predicted tokenField
	done      bool
}

func newTailScan() *tailScan {
	return &tailScan{
		usage:     tokenField{key: usageKey},
		evaluated: tokenField{key: evaluatedKey},
		predicted: tokenField{key: predictedKey},
	}
}

func (s *tailScan) feed(p []byte) {
	head := p
	if len(head) > carrySize {
		head = head[:carrySize]
	}
	s.joint = append(append(s.joint[:0], s.carry...), head...)
	carried := len(s.carry)
	s.usage.feed(s.joint, carried, p)
	s.evaluated.feed(s.joint, carried, p)
	s.predicted.feed(s.joint, carried, p)
	s.done = s.done || bytes.Contains(p, doneEvent) || bytes.Contains(s.joint, doneEvent)
	if len(p) >= carrySize {
		s.carry = append(s.carry[:0], p[len(p)-carrySize:]...)
	} else {
		s.carry = append(s.carry, p...)
		if len(s.carry) > carrySize {
			s.carry = append(s.carry[:0], s.carry[len(s.carry)-carrySize:]...)
		}
	}
}

type usageCounts struct {
	PromptTokens     *int64 `json:"prompt_tokens"`
	CompletionTokens *int64 `json:"completion_tokens"`
}

// tokens are the answer's last usage object (embeddings: prompt only, so no completion
// tokens), else llama.cpp's own counts; nil when unknown.
func (s *tailScan) tokens() (*int64, *int64) {
	s.usage.settle(true)
	s.evaluated.settle(true)
	s.predicted.settle(true)
	counts := usageCounts{}
	if len(s.usage.value) > 0 && json.Unmarshal(s.usage.value, &counts) == nil && counts.PromptTokens != nil {
		if counts.CompletionTokens == nil {
			counts.CompletionTokens = new(int64)
		}
		if *counts.PromptTokens >= 0 && *counts.CompletionTokens >= 0 {
			return counts.PromptTokens, counts.CompletionTokens
		}
		return nil, nil
	}
	prompt, completion := count(s.evaluated.value), count(s.predicted.value)
	if prompt == nil || completion == nil {
		return nil, nil
	}
	return prompt, completion
}

func count(value json.RawMessage) *int64 {
	var number int64
	if len(value) == 0 || json.Unmarshal(value, &number) != nil || number < 0 {
		return nil
	}
	return &number
}

// usageMeter is the ResponseWriter of one request of a known key.
type usageMeter struct {
	rw          http.ResponseWriter
	flusher     http.Flusher
	req         *http.Request
	log         *usageLog
	key         string
	hint        string
	start       time.Time
	facts       *requestFacts
	service     string
	code        int
	wroteHeader bool
	completed   bool
	writeFailed bool
	// include_usage was added for this request: the usage event is not the client's to see
	hideUsage bool
	stripping bool
	event     []byte
	scan      *tailScan
}

func (m *ModelRouter) meter(rw http.ResponseWriter, req *http.Request, digest string) *usageMeter {
	flusher, _ := rw.(http.Flusher)
	return &usageMeter{
		rw: rw, flusher: flusher, req: req, log: m.usage, key: digest, hint: m.hints[digest],
		start: time.Now(), scan: newTailScan(),
	}
}

// serve forwards the request to the chosen service, asking for usage in a stream that did
// not ask for it.
func (w *usageMeter) serve(next http.Handler, req *http.Request, service string) {
	w.service = service
	facts := readFacts(req)
	w.facts = &facts
	if facts.stream && !facts.askedUsage && streamPaths[req.URL.Path] {
		if body := facts.withUsageAsked(); body != nil {
			req.Body = io.NopCloser(bytes.NewReader(body))
			req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
			req.ContentLength = int64(len(body))
			w.hideUsage = true
		}
	}
	next.ServeHTTP(w, req)
	w.completed = true
}

func (w *usageMeter) Header() http.Header {
	return w.rw.Header()
}

func (w *usageMeter) WriteHeader(code int) {
	if code < 200 || w.wroteHeader {
		w.rw.WriteHeader(code)
		return
	}
	w.wroteHeader = true
	w.code = code
	if w.hideUsage && code < 300 && strings.HasPrefix(w.rw.Header().Get("Content-Type"), "text/event-stream") {
		w.stripping = true
		w.rw.Header().Del("Content-Length") // the usage event's bytes will be missing
	}
	w.rw.WriteHeader(code)
}

// Write passes p on at once and flushes it: Traefik's proxy cannot see this wrapper's Flush
// through Yaegi (traefik#10269), so a stream would otherwise arrive only at its end.
func (w *usageMeter) Write(p []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	w.scan.feed(p)
	out := p
	if w.stripping {
		out = w.withoutUsageEvent(p)
	}
	if len(out) > 0 {
		if _, err := w.rw.Write(out); err != nil {
			w.writeFailed = true
			return 0, err
		}
		if w.flusher != nil {
			w.flusher.Flush()
		}
	}
	return len(p), nil
}

// withoutUsageEvent passes on the complete events of the stream so far, less the usage event;
// an unfinished event waits for its end (the client could not use half of one anyway).
func (w *usageMeter) withoutUsageEvent(p []byte) []byte {
	data := p
	if len(w.event) > 0 {
		data = append(w.event, p...)
	}
	end := -1
	for _, boundary := range eventEnds {
		if at := bytes.LastIndex(data, boundary); at >= 0 && at+len(boundary) > end {
			end = at + len(boundary)
		}
	}
	if end < 0 {
		if len(data) > eventLimit {
			w.stripping = false
			w.event = nil
			return data
		}
		w.event = append(w.event[:0], data...)
		return nil
	}
	w.event = append([]byte(nil), data[end:]...)
	return dropUsageEvent(data[:end])
}

// dropUsageEvent removes the events without choices from whole events: the usage event, which
// exists only because Routheon asked for it, and which clients that read choices[0] of every
// chunk cannot take.
func dropUsageEvent(events []byte) []byte {
	for {
		at := -1
		for _, pattern := range emptyChoices {
			if found := bytes.Index(events, pattern); found >= 0 && (at < 0 || found < at) {
				at = found
			}
		}
		if at < 0 {
			return events
		}
		start, stop := 0, len(events)
		for _, boundary := range eventEnds {
			if found := bytes.LastIndex(events[:at], boundary); found >= 0 && found+len(boundary) > start {
				start = found + len(boundary)
			}
			if found := bytes.Index(events[at:], boundary); found >= 0 && at+found+len(boundary) < stop {
				stop = at + found + len(boundary)
			}
		}
		events = append(events[:start:start], events[stop:]...)
	}
}

// end writes the request's record; it runs deferred, also when the proxy aborts the answer
// (it panics with http.ErrAbortHandler when the client or the backend goes away mid-answer).
func (w *usageMeter) end() {
	if w.completed && len(w.event) > 0 {
		if _, err := w.rw.Write(w.event); err != nil {
			w.writeFailed = true
		}
	}
	if w.facts == nil {
		facts := readFacts(w.req)
		w.facts = &facts
	}
	finished := time.Now().UTC()
	code := w.code
	prompt, completion := w.scan.tokens()
	// answered: a client that hangs up after the tokens or the stream's end got its answer
	answered := w.completed || prompt != nil || w.scan.done
	outcome := "no_usage"
	switch {
	case w.service == "":
		outcome = "refused"
	case code == statusClientClosed || (!answered && (w.writeFailed || w.req.Context().Err() != nil)):
		outcome = "client_gone"
		if code == statusClientClosed {
			code = 0 // Traefik's status for the client that was no longer there to get it
		}
	case code >= 400 || !answered:
		outcome = "error"
	case prompt != nil:
		outcome = "ok"
	}
	line, err := json.Marshal(record{
		Time:             finished.Format("2006-01-02T15:04:05.000Z"),
		DurationMs:       float64(finished.Sub(w.start).Microseconds()/100) / 10,
		Key:              w.key,
		Hint:             w.hint,
		Model:            w.facts.model,
		Service:          w.service,
		Method:           w.req.Method,
		Path:             w.req.URL.Path,
		Code:             code,
		Stream:           w.facts.stream,
		PromptTokens:     prompt,
		CompletionTokens: completion,
		Outcome:          outcome,
	})
	if err != nil {
		return
	}
	w.log.add(finished.Format("2006-01-02"), append(line, '\n'))
}
